"""Model zoo: the paper's ConvNet, a CIFAR ResNet-18 and a small demo CNN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lowprec_fl.models.convnet import ConvNet
from lowprec_fl.models.resnet import resnet18_cifar
from lowprec_fl.models.small_cnn import SmallCNN

#: Config names of the models, and how each is built for (channels, classes, image size).
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "convnet": lambda c, n, size, **kw: ConvNet(c, n, image_size=size, **kw),
    "resnet18": lambda c, n, size, **kw: resnet18_cifar(c, n, **kw),
    "small_cnn": lambda c, n, size, **kw: SmallCNN(c, n, image_size=size, **kw),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_BUILDERS)


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any
) -> nn.Module:
    """Build model `name` for images of `in_channels` x `image_size`^2 and `num_classes` classes."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return MODEL_BUILDERS[name](in_channels, num_classes, image_size, **kwargs)


__all__ = ["MODEL_NAMES", "ConvNet", "SmallCNN", "build_model", "resnet18_cifar"]
