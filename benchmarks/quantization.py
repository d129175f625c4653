"""Quantization benchmarks: training-step overhead, codec throughput and encoded sizes.

Run ``python -m benchmarks.quantization``. Prints one line per figure,
``<name>: <measured> (target <op> <value>)`` or ``(no target)``, and writes the figures as JSON
to ``benchmarks/results/quantization.json``. Every baseline is measured in the same run, in
the same process, under the allocator setting the ClientApp uses (``lowprec_fl/task/allocator.py``).
``--device cuda`` times only the training steps, on the GPU (``quantization_cuda.json``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from benchmarks.report import RESULTS_DIR, Figure, print_int8_availability, write_results
from client_app.state import save_optimizer_state
from lowprec_fl.federated_data import load_image_data
from lowprec_fl.models import ConvNet, resnet18_cifar
from lowprec_fl.task.allocator import retain_freed_memory
from quantization import (
    FP32,
    BlockFloat,
    LowBitState,
    LowPrecisionOptimizer,
    QuantizedState,
    QuantizedTensor,
    TrainingPrecision,
    encode,
)
from quantization.attach import LowPrecisionLayers, attach_low_precision
from quantization.compact_saved import (
    pack_saved,
    unpack_saved,
)

RESULTS_PATH = RESULTS_DIR / "quantization.json"
SEED = 0
BATCH_SIZE = 32
STEP_WARMUP = 3
STEP_ROUNDS = 15
STEP_MIN_ROUNDS = 3
STEP_BUDGET_S = 60.0
STEPS_PER_ROUND = 6
CODEC_REPEATS = 5
WIRE_BLOCK = 32
CPU = torch.device("cpu")


def convnet() -> nn.Module:
    """The paper's ConvNet for 1x32x32 inputs, seeded."""
    torch.manual_seed(SEED)
    return ConvNet(in_channels=1, num_classes=10, width=128, depth=3, image_size=32)


def resnet18() -> nn.Module:
    """ResNet-18 (CIFAR stem) for 3x32x32 inputs, seeded."""
    torch.manual_seed(SEED)
    return resnet18_cifar(in_channels=3, num_classes=10)


def training_batch(dataset: str = "synthetic") -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of images padded to 32x32 from a synthetic set (no data download):
    ``synthetic`` is 1x28x28 like MNIST, ``synthetic_rgb`` 3x32x32 like CIFAR."""
    data = load_image_data(dataset, None, train=True, pad_to=32)
    x, y = next(data.batches(BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(1)))
    return x, y


def fp32_step_fn(
    x: torch.Tensor, y: torch.Tensor, make_model: Callable[[], nn.Module] = convnet
) -> Callable[[], None]:
    """A closure running one plain float32 Adam step of the model (the ConvNet)."""
    model = make_model().to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def precision_at(bits: int, parameter_layout: str) -> TrainingPrecision:
    """Every role at ``bits``: parameters, gradients and state in ``parameter_layout`` blocks
    (``block``: 32-element blocks, the project default; ``auto``: the reference code's
    per-kernel/per-row layout), activations and errors one exponent per tensor."""
    param = BlockFloat(bits, layout=parameter_layout, block_size=WIRE_BLOCK)
    flow = BlockFloat(bits, layout="tensor")
    return TrainingPrecision(weight=param, grad=param, activation=flow, error=flow, state=param)


def lowp_training(
    precision: TrainingPrecision,
    arithmetic: str = "fake",
    make_model: Callable[[], nn.Module] = convnet,
    device: torch.device = CPU,
) -> tuple[nn.Module, LowPrecisionOptimizer, LowPrecisionLayers]:
    """(model, optimizer, attached layers) set up as ``train_local`` sets them up: weights
    ... optimizer state quantized; ``arithmetic="int8"``: conv/linear products on integer
    codes, codes and ReLU masks saved for backward, weights kept as codes between steps
    (``train.arithmetic``)."""
    model = make_model().to(device)
    generator = torch.Generator().manual_seed(SEED)
    layers = attach_low_precision(model, precision, generator, arithmetic)
    opt = LowPrecisionOptimizer.from_precision(
        torch.optim.Adam(model.parameters(), lr=1e-3), precision, generator
    )
    return model, opt, layers


def lowp_step_fn(
    x: torch.Tensor,
    y: torch.Tensor,
    precision: TrainingPrecision,
    arithmetic: str = "fake",
    make_model: Callable[[], nn.Module] = convnet,
) -> Callable[[], None]:
    """A closure running one low-precision step (``lowp_training``)."""
    model, opt, layers = lowp_training(precision, arithmetic, make_model, x.device)

    def step() -> None:
        opt.zero_grad()
        with layers.forward():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        layers.optimizer_step(opt)

    return step


def time_round(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, averaged over ``steps`` consecutive calls."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize()
    return (time.perf_counter() - start) / steps


def bench_train_step(device: torch.device = CPU, single_thread: bool = False) -> list[Figure]:
    """Interleaved timing of the 8-bit and the float32 ConvNet training step.

    Each round times every variant back to back; a ratio is the median over rounds of that
    round's ratio, so a slow spell of a shared machine slows both sides of it alike.
    ``single_thread``: both steps on one torch thread, as each simulated client trains by
    default (``train.threads=1``); otherwise on torch's default thread count.
    """
    threads = torch.get_num_threads()
    if single_thread:
        torch.set_num_threads(1)
    try:
        samples = _step_seconds(device, with_reference_layout=not single_thread)
    finally:
        torch.set_num_threads(threads)

    def ratio(name: str) -> float:
        return paired_ratio(samples, name, "fp32")

    if single_thread:
        return [Figure("train_step_ratio_8bit_vs_fp32_1thread", ratio("8bit"), "x")]
    figures = [
        Figure("train_step_ratio_8bit_vs_fp32", ratio("8bit"), "x", "<= 1.3"),
        Figure(
            "train_step_ratio_8bit_reference_layout_vs_fp32", ratio("8bit_reference_layout"), "x"
        ),
        Figure("train_step_ratio_8bit_channel_layout_vs_fp32", ratio("8bit_channel_layout"), "x"),
    ]
    if "int8" in samples:  # integer products are CPU-only
        figures.append(Figure("train_step_ratio_int8_vs_fp32", ratio("int8"), "x", "<= 0.67"))
    return figures + [
        Figure(
            f"train_step_{name}_ms",
            statistics.median(times) * 1e3,
            "ms",
            samples=tuple(times),
        )
        for name, times in samples.items()
    ]


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            total += value.nbytes() if isinstance(value, QuantizedState) else value.nbytes
    return total


def training_memory_bytes(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    compact: bool = False,
    layers: LowPrecisionLayers | None = None,
) -> dict[str, int]:
    """Bytes of a training step, by part: weights, gradients, optimizer state and the tensors
    autograd saved for backward at the end of the forward pass (distinct storages, parameters
    excluded; ``compact``: as ``saved_as_codes`` packs them); and ``peak``, the most bytes of
    CPU tensors alive at any point of the step, temporaries included: what the step held when
    it began (weights and state: the last step's gradients are dropped by ``zero_grad``
    before it) plus its largest allocation growth.
    With ``layers``, the optimizer steps through ``layers.optimizer_step`` (int8: weights kept
    as codes between steps, counted as their codes and steps)."""
    params = list(model.parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}
    pack, unpack = (pack_saved, unpack_saved) if compact else (lambda t: t, lambda t: t)

    def step(count: bool) -> None:
        not_saved = param_storages | parked_storages()  # weights, counted as weights

        def counting_pack(t: torch.Tensor) -> object:
            packed = pack(t)
            stored = packed if isinstance(packed, torch.Tensor) else packed.codes
            storage = stored.untyped_storage()
            if count and storage.data_ptr() not in not_saved:
                saved[storage.data_ptr()] = storage.nbytes()
            return packed

        with torch.autograd.graph.saved_tensors_hooks(counting_pack, unpack):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if layers is None:
            opt.step()
        else:
            layers.optimizer_step(opt)

    def parked_storages() -> set[int]:  # the parked weights' codes and steps
        parked = [] if layers is None or layers.integer is None else layers.integer.parked_tensors()
        return {t.untyped_storage().data_ptr() for t in parked}

    def weight_bytes() -> int:  # a parked weight's storage is a 4-byte placeholder
        parked = 0 if layers is None else layers.parked_weight_bytes()
        return sum(p.untyped_storage().nbytes() for p in params) + parked

    opt.zero_grad()
    step(count=False)  # the optimizer state exists from here on
    # the gradients are freed here, not inside the profiled step, where the profiler would
    # miss the release of memory allocated before it started and count them twice
    opt.zero_grad()
    held_before = (
        weight_bytes()
        + sum(p.grad.nbytes for p in params if p.grad is not None)
        + _state_bytes(getattr(opt, "optimizer", opt))
    )
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step(count=True)
    return {
        "weights": weight_bytes(),
        "gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_state": _state_bytes(getattr(opt, "optimizer", opt)),
        "saved_activations": sum(saved.values()),
        "peak": held_before + _peak_allocation_growth(prof),
    }


def _peak_allocation_growth(prof: torch.profiler.profile) -> int:
    """The largest net growth of allocated CPU tensor bytes during a profiled span, from the
    profiler's allocation and free events in time order."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def bench_train_step_memory() -> list[Figure]:
    """The ConvNet step's memory (``training_memory_bytes``), every role at 8 bits and Adam's
    state in the default 8-bit low-bit format, against the float32 step's: ``peak``, and
    ``held`` (weights, gradients, state and saved tensors at the end of the forward pass)."""
    x, y = training_batch()
    torch.manual_seed(SEED)
    fp32_model = convnet()
    fp32 = training_memory_bytes(
        fp32_model, torch.optim.Adam(fp32_model.parameters(), lr=1e-3), x, y
    )
    variants = {
        "8bit": (replace(precision_at(8, "block"), state=LowBitState.at(8)), "fake"),
        "int8": (replace(precision_at(8, "channel"), state=LowBitState.at(8)), "int8"),
    }
    figures = [Figure(f"train_step_memory_fp32_{k}_bytes", float(v), "B") for k, v in fp32.items()]
    for name, (precision, arithmetic) in variants.items():
        model, opt, layers = lowp_training(precision, arithmetic)
        parts = training_memory_bytes(model, opt, x, y, arithmetic == "int8", layers)
        target = "<= 0.6" if name == "int8" else None
        peak = parts["peak"] / fp32["peak"]
        held = (sum(parts.values()) - parts["peak"]) / (sum(fp32.values()) - fp32["peak"])
        figures += [
            Figure(f"train_step_peak_memory_{name}_vs_fp32", peak, "x", target),
            Figure(f"train_step_held_memory_{name}_vs_fp32", held, "x"),
        ]
        figures += [
            Figure(f"train_step_memory_{name}_{k}_bytes", float(v), "B") for k, v in parts.items()
        ]
    return figures


def bench_resnet_step() -> list[Figure]:
    """ResNet-18 at 32x32, batch 32: the 8-bit fake-quant and int8 steps against float32.

    Its stride-2 convs' backward products and BatchNorm stay in float32 on the int8 path
    (logged per layer); no target, reported as measured.
    """
    x, y = training_batch("synthetic_rgb")
    fns = {
        "fp32": fp32_step_fn(x, y, resnet18),
        "8bit": lowp_step_fn(x, y, precision_at(8, "block"), make_model=resnet18),
        "int8": lowp_step_fn(x, y, precision_at(8, "channel"), "int8", make_model=resnet18),
    }
    samples = interleaved_seconds(fns, scale_steps=1 / STEPS_PER_ROUND)
    ratios = {name: paired_ratio(samples, name, "fp32") for name in ("8bit", "int8")}
    return [
        Figure(f"resnet18_train_step_ratio_{name}_vs_fp32", value, "x")
        for name, value in ratios.items()
    ] + [
        Figure(f"resnet18_train_step_{name}_ms", statistics.median(t) * 1e3, "ms", samples=tuple(t))
        for name, t in samples.items()
    ]


def _step_seconds(device: torch.device, with_reference_layout: bool) -> dict[str, list[float]]:
    """Seconds per step of each variant, one sample per round, variants alternating order."""
    x, y = (t.to(device) for t in training_batch())
    fns = {"fp32": fp32_step_fn(x, y), "8bit": lowp_step_fn(x, y, precision_at(8, "block"))}
    if with_reference_layout:  # the multi-threaded run: also the layouts and the integer path
        fns["8bit_reference_layout"] = lowp_step_fn(x, y, precision_at(8, "auto"))
        fns["8bit_channel_layout"] = lowp_step_fn(x, y, precision_at(8, "channel"))
        if device.type == "cpu":
            fns["int8"] = lowp_step_fn(x, y, precision_at(8, "channel"), arithmetic="int8")
    return interleaved_seconds(fns, device)


def interleaved_seconds(
    fns: dict[str, Callable[[], None]],
    device: torch.device = CPU,
    scale: int = 1,
    scale_steps: float = 1.0,
) -> dict[str, list[float]]:
    """Seconds per call of each closure, one sample per round, the closures run back to back
    in alternating order (``scale`` times the usual calls per round, for short closures;
    ``scale_steps`` < 1 for long ones: at least one call per round)."""
    calls = max(1, round(STEPS_PER_ROUND * scale * scale_steps))
    for fn in fns.values():  # first calls load/compile numba kernels and warm allocators
        time_round(fn, max(1, round(STEP_WARMUP * scale * scale_steps)), device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(STEP_ROUNDS):
        if r >= STEP_MIN_ROUNDS and time.perf_counter() - start > STEP_BUDGET_S:
            break  # a busy machine: keep the whole run within a few minutes
        order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for name in order:
            samples[name].append(time_round(fns[name], calls, device))
    return samples


def paired_ratio(samples: dict[str, list[float]], name: str, baseline: str) -> float:
    """The median over rounds of ``name``'s time over ``baseline``'s in the same round."""
    pairs = zip(samples[name], samples[baseline], strict=True)
    return statistics.median(t / b for t, b in pairs)


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point tensors of ``model``'s state dict (what a client uploads)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def median_seconds(fn: Callable[[], object], repeats: int = CODEC_REPEATS) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


Payload = dict[str, tuple[np.ndarray, np.ndarray, tuple[int, ...]]]


def encode_all(tensors: dict[str, torch.Tensor], fmt: BlockFloat, seed: int = SEED) -> Payload:
    """Encode every tensor and pack it into wire arrays (mantissas, exponents, shape)."""
    generator = torch.Generator().manual_seed(seed)
    payload: Payload = {}
    for name, t in tensors.items():
        mantissas, exponents = encode(t, fmt, generator).to_payload()
        payload[name] = (mantissas, exponents, tuple(t.shape))
    return payload


def decode_all(payload: Payload, fmt: BlockFloat) -> dict[str, torch.Tensor]:
    """Validate and unpack wire arrays, then dequantize them to float32 tensors."""
    return {
        name: QuantizedTensor.from_payload(m, e, shape, fmt).decode()
        for name, (m, e, shape) in payload.items()
    }


def bench_codec_throughput() -> list[Figure]:
    """Encode/decode of a ResNet-18 state dict (~11M floats) vs a plain copy of the same bytes."""
    torch.manual_seed(SEED)
    tensors = float_state_dict(resnet18_cifar(in_channels=3, num_classes=10))
    numel = sum(t.numel() for t in tensors.values())
    gigabytes = 4 * numel / 1e9
    copy_s = median_seconds(lambda: [t.clone() for t in tensors.values()])
    figures = [
        Figure("codec_state_dict_elements", float(numel), "floats"),
        Figure("memcpy_gbps", gigabytes / copy_s, "GB/s"),
    ]
    for bits in (8, 4):
        fmt = BlockFloat(bits, layout="block", block_size=WIRE_BLOCK)
        encode_s = median_seconds(lambda fmt=fmt: encode_all(tensors, fmt))
        payload = encode_all(tensors, fmt)
        decode_s = median_seconds(lambda fmt=fmt, payload=payload: decode_all(payload, fmt))
        figures += [
            Figure(f"encode_{bits}bit_gbps", gigabytes / encode_s, "GB/s"),
            Figure(f"encode_throughput_{bits}bit_vs_memcpy", copy_s / encode_s, "x"),
            Figure(f"decode_{bits}bit_gbps", gigabytes / decode_s, "GB/s"),
            Figure(f"decode_throughput_{bits}bit_vs_memcpy", copy_s / decode_s, "x"),
        ]
    return figures


def encoded_size_ratio(tensors: dict[str, torch.Tensor], fmt: BlockFloat) -> float:
    """Bytes of mantissas plus exponents over float32 bytes, for every tensor in ``fmt``."""
    encoded = sum(encode(t, fmt).payload_bytes() for t in tensors.values())
    return encoded / sum(4 * t.numel() for t in tensors.values())


def bench_encoded_size() -> list[Figure]:
    """Upload size of the ConvNet (width 128) state dict at 8 and 4 bits: the default wire
    layout (32-element blocks) against its target, the reference per-kernel layout reported."""
    tensors = float_state_dict(convnet())
    targets = {8: "<= 0.26", 4: "<= 0.135"}
    figures = []
    for bits in (8, 4):
        block = BlockFloat(bits, layout="block", block_size=WIRE_BLOCK)
        auto = BlockFloat(bits, layout="auto")
        figures += [
            Figure(
                f"encoded_size_ratio_{bits}bit",
                encoded_size_ratio(tensors, block),
                "",
                targets[bits],
            ),
            Figure(
                f"encoded_size_ratio_{bits}bit_reference_layout",
                encoded_size_ratio(tensors, auto),
                "",
            ),
        ]
    return figures


def bench_optimizer_state() -> list[Figure]:
    """Adam's state of the ConvNet after a step, stored as the client stores it, and the time
    of the optimizer step alone and of the whole training step with each state format
    (interleaved, median of per-round ratios to the BFP state).

    Sizes are the bytes ``client_app.state.save_optimizer_state`` writes (codes, scales and
    array headers) against the same state in float32.
    """
    x, y = training_batch()
    weights = precision_at(8, "block")
    states = {
        "fp32": FP32,
        "bfp8": weights.state,
        "lowbit8": LowBitState.at(8),
        "lowbit4": LowBitState.at(4),
    }
    precisions = {name: replace(weights, state=state) for name, state in states.items()}
    sizes = {}
    for name, precision in precisions.items():
        model = convnet()
        opt = LowPrecisionOptimizer.from_precision(
            torch.optim.Adam(model.parameters(), lr=1e-3), precision, torch.Generator()
        )
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sizes[name] = save_optimizer_state(RecordDict(), opt)
    quantized = [name for name in precisions if name != "fp32"]
    train = interleaved_seconds({name: lowp_step_fn(x, y, precisions[name]) for name in quantized})
    optimizer_only = interleaved_seconds(
        {name: optimizer_step_fn(x, y, precisions[name]) for name in quantized}, scale=10
    )

    def step_ratio(name: str, samples: dict[str, list[float]] = train) -> float:
        return paired_ratio(samples, name, "bfp8")

    return [
        Figure("optimizer_state_bytes_fp32", float(sizes["fp32"]), "B"),
        Figure("optimizer_state_ratio_bfp8_vs_fp32", sizes["bfp8"] / sizes["fp32"], "x"),
        Figure(
            "optimizer_state_ratio_lowbit8_vs_fp32",
            sizes["lowbit8"] / sizes["fp32"],
            "x",
            "<= 0.27",
        ),
        Figure(
            "optimizer_state_ratio_lowbit4_vs_fp32",
            sizes["lowbit4"] / sizes["fp32"],
            "x",
            "<= 0.145",
        ),
        Figure(
            "optimizer_step_ratio_lowbit8_vs_bfp8_state",
            step_ratio("lowbit8", optimizer_only),
            "x",
            "<= 1.0",
        ),
        Figure(
            "optimizer_step_ratio_lowbit4_vs_bfp8_state",
            step_ratio("lowbit4", optimizer_only),
            "x",
            "<= 1.0",
        ),
        Figure("train_step_ratio_lowbit8_vs_bfp8_state", step_ratio("lowbit8"), "x"),
        Figure("train_step_ratio_lowbit4_vs_bfp8_state", step_ratio("lowbit4"), "x"),
    ]


def optimizer_step_fn(
    x: torch.Tensor, y: torch.Tensor, precision: TrainingPrecision
) -> Callable[[], None]:
    """A closure running only ``LowPrecisionOptimizer.step()`` of the ConvNet (its gradients
    computed once; quantizing them again is the same work each call)."""
    model = convnet()
    opt = LowPrecisionOptimizer.from_precision(
        torch.optim.Adam(model.parameters(), lr=1e-3), precision, torch.Generator()
    )
    nn.functional.cross_entropy(model(x), y).backward()
    return opt.step


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.quantization``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run every benchmark (only the training steps on a GPU), print the figures, save them."""
    device = torch.device(build_parser().parse_args(argv).device)
    start = time.perf_counter()
    print_int8_availability()
    retain_freed_memory()  # as the ClientApp does (train.retain_freed_memory), for every variant
    benches: tuple[Callable[[], list[Figure]], ...] = (
        bench_train_step_memory,
        bench_train_step,
        lambda: bench_train_step(single_thread=True),
        bench_resnet_step,
        bench_codec_throughput,
        bench_encoded_size,
        bench_optimizer_state,
    )
    path = RESULTS_PATH
    if device.type == "cuda":
        benches = (lambda: bench_train_step(device),)
        path = RESULTS_PATH.with_name("quantization_cuda.json")
    figures: list[Figure] = []
    for bench in benches:
        for figure in bench():
            print(figure.line(), flush=True)
            figures.append(figure)
    path = write_results(figures, time.perf_counter() - start, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
