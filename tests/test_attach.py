"""attach_low_precision: one call sets up either arithmetic, and removing it restores the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantization import BlockFloat, TrainingPrecision, attach_low_precision, quantize_


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5)
    )


def _precision() -> TrainingPrecision:
    weight = BlockFloat(8, layout="channel")
    flow = BlockFloat(8, layout="tensor")
    return TrainingPrecision(weight=weight, grad=weight, activation=flow, error=flow, state=weight)


@pytest.mark.parametrize("arithmetic", ["fake", "int8"])
def test_both_arithmetics_compute_the_same_function_and_remove_cleanly(arithmetic):
    model = _model()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():  # on the weight grid, as a LowPrecisionOptimizer keeps it
            quantize_(p, _precision().weight)
    plain = model(x)
    outputs = {}
    for name in ("fake", arithmetic):
        with attach_low_precision(
            model, _precision(), torch.Generator().manual_seed(2), name
        ) as layers:
            with layers.forward():
                outputs[name] = model(x)
            assert layers.arithmetic == name and len(layers.quantizers) > 0
            # integer layers, ReLUs with bit masks, shape-only pooling, GroupNorm from codes
            assert len(layers.rerouted) == (4 if name == "int8" else 0)
    torch.testing.assert_close(outputs[arithmetic], outputs["fake"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(outputs["fake"], plain)  # the quantizers were on
    assert torch.equal(model(x), plain)  # and are gone, as are the rerouted forwards
    assert all("forward" not in vars(m) for m in model.modules())


def test_an_unknown_arithmetic_is_refused_by_name():
    with pytest.raises(
        ValueError, match=r"unknown arithmetic 'int4': use one of \('fake', 'int8'\)"
    ):
        attach_low_precision(_model(), _precision(), arithmetic="int4")


@pytest.mark.usefixtures("int8_products_allowed")
def test_int8_leaves_the_model_its_images_as_given_and_a_float32_conv_outputs_channels_last(
    monkeypatch,
):
    # a model whose first op views its images (no copy: needs their own memory order); it runs
    # no integer product (the conv's input and the head's are off the grid), so the routes'
    # availability on this CPU does not matter
    class ViewFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(3 * 8 * 8 + 4 * 8 * 8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.conv(x))
            return self.head(torch.cat([x.view(x.shape[0], -1), seen[-1].flatten(1)], 1))

    monkeypatch.setattr("quantization.integer_ops.onednn_int8_conv_exact", lambda: None)
    seen: list[torch.Tensor] = []
    model, x = ViewFirst(), torch.randn(2, 3, 8, 8)
    with attach_low_precision(model, _precision(), arithmetic="int8") as layers, layers.forward():
        model(x).sum().backward()
    assert seen[-1].is_contiguous(memory_format=torch.channels_last)


def test_a_failed_attach_leaves_the_model_as_it_was(monkeypatch):
    def failing(*args):
        raise RuntimeError("no integer route (test)")

    monkeypatch.setattr("quantization.attach.attach_masked_relu", failing)
    model, x = _model(), torch.randn(2, 1, 8, 8)
    plain = model(x)
    with pytest.raises(RuntimeError, match="no integer route"):
        attach_low_precision(model, _precision(), arithmetic="int8")
    assert torch.equal(model(x), plain)  # no quantizer hook left behind
    assert all("forward" not in vars(m) for m in model.modules())  # nor a rerouted layer
