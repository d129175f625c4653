"""Tests for the model zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowprec_fl.models import MODEL_NAMES, ConvNet, SmallCNN, build_model, resnet18_cifar


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_convnet_matches_paper_size() -> None:
    model = ConvNet(in_channels=1, num_classes=10, width=128, depth=3, image_size=32)
    assert _num_params(model) == 317_706
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_convnet_is_built_from_hookable_modules() -> None:
    model = ConvNet()
    types = [type(m) for m in model.modules()]
    assert types.count(nn.Conv2d) == 3 and types.count(nn.GroupNorm) == 3
    assert types.count(nn.ReLU) == 3 and types.count(nn.AvgPool2d) == 3
    assert types.count(nn.Linear) == 1
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_groups == m.num_channels == 128 for m in norms)
    seen: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: seen.append(type(mod).__name__))
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ReLU | nn.Linear)
    ]
    model(torch.zeros(1, 1, 32, 32))
    for h in handles:
        h.remove()
    assert seen == ["Conv2d", "ReLU"] * 3 + ["Linear"]


@pytest.mark.parametrize(
    ("name", "channels", "classes", "size"),
    [
        ("convnet", 1, 10, 32),
        ("convnet", 3, 100, 32),
        ("convnet", 1, 10, 28),
        ("resnet18", 3, 10, 32),
        ("resnet18", 1, 100, 32),
        ("small_cnn", 1, 10, 28),
        ("small_cnn", 3, 10, 32),
    ],
)
def test_forward_shapes(name: str, channels: int, classes: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size)
    model.eval()
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_resnet18_cifar_stem() -> None:
    model = resnet18_cifar(in_channels=3, num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert 11_000_000 < _num_params(model) < 11_300_000


def test_small_cnn_is_small() -> None:
    assert 20_000 <= _num_params(SmallCNN(1, 10, 28)) <= 60_000
    assert 20_000 <= _num_params(SmallCNN(1, 10, 32)) <= 60_000


def test_build_model_passes_kwargs_and_validates() -> None:
    narrow = build_model("convnet", 1, 10, 32, width=16, depth=2)
    assert _num_params(narrow) < _num_params(build_model("convnet", 1, 10, 32))
    assert set(MODEL_NAMES) == {"convnet", "resnet18", "small_cnn"}
    with pytest.raises(ValueError, match=r"convnet.*resnet18.*small_cnn"):
        build_model("vgg", 1, 10, 32)
    with pytest.raises(ValueError, match="too small"):
        build_model("convnet", 1, 10, 4, depth=3)
