"""The CUDA path: same codes as the CPU kernel, low-precision training and state on the GPU.

Skipped without a GPU. Run on a GPU machine with ``pytest tests/test_cuda.py``. This file
imports only torch, ``quantization``, ``lowprec_fl.models`` and ``lowprec_fl.task.training``, so
it also runs with ``--noconftest`` where Flower itself is not installed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowprec_fl.federated_data import load_image_data
from lowprec_fl.models import ConvNet, SmallCNN
from lowprec_fl.task.training import evaluate_model, make_optimizer, train_local
from quantization import (
    BlockFloat,
    LowPrecisionOptimizer,
    TrainingPrecision,
    decode,
    encode,
    quantize,
    quantize_codes,
)
from quantization import quantizer as quantizer_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
LAYOUTS = [("tensor", 32), ("channel", 32), ("kernel", 32), ("block", 32), ("block", 7)]


def _on_grid(t: torch.Tensor, fmt: BlockFloat) -> bool:
    """Whether ``t`` is unchanged by nearest rounding onto its own grid."""
    nearest = BlockFloat(fmt.bits, layout=fmt.layout, block_size=fmt.block_size, rounding="nearest")
    return torch.equal(quantize(t, nearest), t)


@pytest.mark.parametrize("layout,block_size", LAYOUTS)
@pytest.mark.parametrize("bits", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest", "up"])
def test_cuda_codes_equal_cpu_kernel_bit_for_bit(layout, block_size, bits, rounding):
    fmt = BlockFloat(bits, layout=layout, rounding=rounding, block_size=block_size)
    x = torch.randn(64, 33, 3, 3, generator=torch.Generator().manual_seed(bits)) * 3
    x[1] = 0
    x[2, 0, 0, 0] = -(2.0**-3)  # a negative power of two: the idempotence refinement
    x[3] *= 1e-30  # tiny magnitudes: exponent clamping
    cpu_codes, cpu_exps = quantize_codes(x, fmt, torch.Generator().manual_seed(5))
    gpu_codes, gpu_exps = quantize_codes(x.to(CUDA), fmt, torch.Generator().manual_seed(5))
    assert gpu_codes.is_cuda
    assert torch.equal(gpu_codes.cpu(), cpu_codes)
    assert torch.equal(gpu_exps.cpu(), cpu_exps)
    cpu_values = quantize(x, fmt, torch.Generator().manual_seed(5))
    gpu_values = quantize(x.to(CUDA), fmt, torch.Generator().manual_seed(5))
    assert torch.equal(gpu_values.cpu().view(torch.int32), cpu_values.view(torch.int32))


def test_cuda_large_tensor_matches_cpu():
    x = torch.randn(3_000_001, generator=torch.Generator().manual_seed(0))
    fmt = BlockFloat(8, layout="block", block_size=32)
    a = quantize(x, fmt, torch.Generator().manual_seed(1))
    b = quantize(x.to(CUDA), fmt, torch.Generator().manual_seed(1))
    assert torch.equal(b.cpu(), a)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_cuda_encode_decode_round_trip(bits):
    fmt = BlockFloat(bits, layout="block", block_size=32)
    x = torch.randn(40, 50, device=CUDA)
    q = encode(x, fmt, torch.Generator().manual_seed(2))
    assert torch.equal(decode(q), quantize(x, fmt, torch.Generator().manual_seed(2)))
    mantissas, exponents = q.to_payload()  # the wire arrays live on the host
    rebuilt = type(q).from_payload(mantissas, exponents, q.shape, fmt)
    assert torch.equal(rebuilt.decode(), decode(q).cpu())


def test_cuda_nan_raises_clear_error():
    x = torch.zeros(100, device=CUDA)
    x[7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x, BlockFloat(8))


def test_cuda_training_keeps_weights_and_state_on_grid_and_learns():
    data = load_image_data("synthetic", None, train=True)
    precision = TrainingPrecision.uniform(8)
    torch.manual_seed(0)
    model = SmallCNN().to(CUDA)
    generator = torch.Generator().manual_seed(0)
    optimizer = make_optimizer(model, "adam", 1e-3, precision, generator)
    before, _ = evaluate_model(model, data, 1000, CUDA)
    result = train_local(
        model,
        optimizer,
        data,
        precision,
        epochs=1,
        batch_size=32,
        generator=generator,
        device=CUDA,
        max_steps=60,
    )
    after, accuracy = evaluate_model(model, data, 1000, CUDA)
    assert result.steps == 60 and after < 0.7 * before and accuracy > 0.5
    for p in model.parameters():
        assert p.is_cuda and _on_grid(p.detach(), precision.weight)
    for state in optimizer.optimizer.state.values():
        assert _on_grid(state["exp_avg"], precision.state)
        assert _on_grid(state["exp_avg_sq"].sqrt(), precision.state)


def test_cuda_optimizer_state_export_import_resumes_training():
    precision = TrainingPrecision.uniform(8)
    torch.manual_seed(0)
    model = ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=28).to(CUDA)
    x, y = torch.randn(8, 1, 28, 28, device=CUDA), torch.randint(0, 10, (8,), device=CUDA)

    def step(opt: LowPrecisionOptimizer) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    first = make_optimizer(model, "adam", 1e-3, precision, torch.Generator().manual_seed(0))
    step(first)
    second = make_optimizer(model, "adam", 1e-3, precision, torch.Generator().manual_seed(1))
    second.import_state(first.export_state())
    step(second)  # Adam's step counter must stay where torch expects it (a CPU scalar)
    for p in model.parameters():
        assert second.optimizer.state[p]["step"].item() == 2.0
        assert second.optimizer.state[p]["exp_avg"].is_cuda


def test_cuda_quantizer_runs_compiled_without_falling_back(recwarn):
    x = torch.randn(1000, device=CUDA)
    for rounding in ("stochastic", "nearest"):
        quantize(x, BlockFloat(8, layout="block", rounding=rounding))
    assert quantizer_module._compile_on_cuda, [str(w.message) for w in recwarn]
