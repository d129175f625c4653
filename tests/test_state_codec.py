"""Low-bit optimizer state: code maps, exact round trips, never-zero second moments, training."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from torch import nn

from client_app.state import load_optimizer_state, save_optimizer_state
from lowprec_fl.wire import WireFormatError, encode_tensors, read_tensors
from quantization import FP32, BlockFloat, LowBitState, LowPrecisionOptimizer, quantize_state
from quantization.state_codec import (
    QuantizedState,
    StateArena,
    StateFormat,
    code_map,
    decode_states,
    first_moment_format,
    num_scales,
    quantize_states,
    second_moment_format,
)

FORMATS = [
    first_moment_format(8),
    first_moment_format(4),
    second_moment_format(8),
    second_moment_format(4),
]
SHAPES = [(64, 3, 3, 3), (10, 257), (300,), (1,), (7, 1)]


def _sample(shape, fmt: StateFormat, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-6, 0, int(np.prod(shape))).reshape(shape)
    return x.abs() ** 2 if not fmt.signed else x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind, signed", [("dynamic", True), ("dynamic", False), ("linear", False)])
def test_code_maps_have_2_to_the_bits_sorted_distinct_values_in_range(bits, kind, signed):
    values = code_map(bits, kind, signed)
    assert values.numel() == 2**bits and torch.all(values[1:] > values[:-1])
    assert values.max() == 1.0 and values.min() >= (-1.0 if signed else 0.0)
    assert (0.0 in values.tolist()) == signed  # unsigned maps have no zero


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_decode_is_exact_on_the_grid_and_through_the_payload(fmt, shape):
    x = _sample(shape, fmt)
    on_grid = quantize_state(x, fmt).decode()
    again = quantize_state(on_grid, fmt)
    assert torch.equal(again.decode(), on_grid)  # a value on its grid encodes losslessly
    codes, scales = again.to_payload()
    back = QuantizedState.from_payload(codes, scales, shape, fmt)
    assert torch.equal(back.decode(), on_grid)
    assert back.nbytes() == codes.nbytes + scales.nbytes


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_nearest_rounding_picks_the_closest_code(fmt):
    fmt = dataclasses.replace(fmt, rounding="nearest")
    x = _sample((40, 50), fmt, seed=3)
    q = quantize_state(x, fmt)
    scale = q.decode().abs().reshape(-1)  # compare in normalized units per element
    decoded = q.decode().reshape(-1)
    values = fmt.values
    from quantization.state_codec import _expand_scales, _scales

    s = _expand_scales(_scales(x, fmt), tuple(x.shape), fmt)
    normalized = (x.reshape(-1) / torch.where(s > 0, s, 1)).clamp(-1, 1)
    best = (normalized[:, None] - values[None, :]).abs().min(dim=1).values
    chosen = (normalized - decoded / torch.where(s > 0, s, 1)).abs()
    assert torch.all(chosen <= best + 1e-6), float((chosen - best).max())
    assert scale.numel() == x.numel()


@pytest.mark.parametrize("fmt", [second_moment_format(8), second_moment_format(4)])
def test_a_nonzero_second_moment_never_decodes_to_zero(fmt):
    # tiny entries next to huge ones in the same block, row and column
    v = torch.full((16, 300), 1e-30)
    v[0, 0] = 1e3
    v[5, 7] = 0.0
    decoded = quantize_state(v, fmt).decode()
    nonzero = v > 0
    assert torch.all(decoded[nonzero] > 0)
    assert torch.isfinite(decoded).all()


def test_stochastic_rounding_is_unbiased_within_the_map():
    fmt = first_moment_format(4)  # the default first moment rounds stochastically
    assert fmt.rounding == "stochastic"
    x = torch.linspace(-0.9, 0.9, 128)
    x[0] = -1.0  # pins the block's scale to 1
    mean = torch.zeros_like(x)
    trials = 4000
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        mean += quantize_state(x, fmt, g).decode()
    mean /= trials
    spacing = torch.diff(fmt.values).max()
    # the mean of n draws has sd <= spacing / (2 sqrt(n)); 5 sd bound
    assert float((mean - x).abs().max()) < 5 * spacing / (2 * trials**0.5)


def test_nearest_rounding_error_is_at_most_half_a_step_and_unbiased_on_average():
    fmt = dataclasses.replace(first_moment_format(8), rounding="nearest")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256 * 400, generator=g)
    q = quantize_state(x, fmt)
    error = q.decode() - x
    blocks = x.reshape(-1, 256).abs().amax(dim=1).repeat_interleave(256)
    step = torch.diff(fmt.values).max()
    assert float((error.abs() / blocks).max()) <= step / 2 + 1e-6
    # symmetric map, symmetric data: the mean error is far below a step
    assert abs(float(error.mean())) < 1e-3 * float(blocks.mean())


def test_state_sizes_per_value():
    numel = 128 * 1152  # a 128 -> 128 3x3 conv
    for bits, first_bound, second_bound in ((8, 0.27, 0.27), (4, 0.145, 0.145)):
        first = (numel + 4 * num_scales((128, 128, 3, 3), first_moment_format(bits))) / (4 * numel)
        packed = numel * bits // 8
        first = (packed + 4 * num_scales((128, 128, 3, 3), first_moment_format(bits))) / (4 * numel)
        second = (packed + 4 * num_scales((128, 128, 3, 3), second_moment_format(bits))) / (
            4 * numel
        )
        assert first <= first_bound and second <= second_bound, (bits, first, second)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"bits": 6}, "4 or 8 bits"),
        ({"bits": 8.0}, "bits must be an int"),
        ({"code_map": "log"}, "code_map"),
        ({"code_map": "linear", "signed": True}, "linear map is unsigned"),
        ({"normalization": "rank2"}, "normalization"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_bad_formats_say_what_is_wrong(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        StateFormat(**kwargs)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_an_unsigned_format_refuses_negative_values_but_takes_negative_zero(backend):
    from quantization.quantizer import torch_backend

    fmt = second_moment_format(8)
    with torch_backend() if backend == "torch" else contextlib.nullcontext():
        for negative in (-1.0, -1e-45):  # the smallest subnormal too
            with pytest.raises(ValueError, match="nonnegative"):
                quantize_state(torch.tensor([2.0] * 300 + [negative]), fmt)
        zero = quantize_state(torch.tensor([2.0] * 300 + [-0.0]), fmt)  # -0.0 is not below 0
        plus = quantize_state(torch.tensor([2.0] * 300 + [0.0]), fmt)
    assert torch.equal(zero.decode(), plus.decode())


# ----------------------------------------------------------------------------- in the optimizer
def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 6 * 6, 3))


def _steps(optimizer: LowPrecisionOptimizer, model: nn.Module, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_low_bit_state_stays_on_its_grid_and_round_trips_through_the_state_record(bits, name):
    fmt = BlockFloat(8, layout="block")
    model = _model()
    make = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    }[name]
    optimizer = LowPrecisionOptimizer(make(model.parameters()), fmt, fmt, LowBitState.at(bits))
    _steps(optimizer, model, 5)
    for p in model.parameters():
        for key, value in optimizer.optimizer.state[p].items():
            if key == "step":
                continue
            fmt_of = (
                LowBitState.at(bits).second if key == "exp_avg_sq" else LowBitState.at(bits).first
            )
            # kept as codes between steps, in the state's own format, not as float32
            assert isinstance(value, QuantizedState) and value.fmt == fmt_of, key
            assert value.codes.dtype == torch.uint8 and value.codes.numel() == -(
                -p.numel() * bits // 8
            )
            on_grid = value.decode()
            nearest = dataclasses.replace(fmt_of, rounding="nearest")
            assert torch.equal(quantize_state(on_grid, nearest).codes, value.codes), key

    record = RecordDict()
    stored_bytes = save_optimizer_state(record, optimizer)
    plain_model = _model()
    plain = LowPrecisionOptimizer(make(plain_model.parameters()), fmt, fmt, FP32)
    _steps(plain, plain_model, 1)
    fp32_bytes = save_optimizer_state(RecordDict(), plain)  # the same state in float32
    assert stored_bytes < (0.3 if bits == 8 else 0.2) * fp32_bytes  # codes, not floats
    twin = _model(seed=1)
    twin.load_state_dict(model.state_dict())
    restored = LowPrecisionOptimizer(make(twin.parameters()), fmt, fmt, LowBitState.at(bits))
    assert load_optimizer_state(record, restored)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key, value in optimizer.optimizer.state[p].items():
            twin_value = restored.optimizer.state[q][key]
            if key == "step":
                assert torch.equal(value, twin_value)
            else:
                assert torch.equal(value.codes, twin_value.codes), key
                assert torch.equal(value.scales, twin_value.scales), key
    # and the next steps are bit-identical (resume), with the same rounding keys
    optimizer.generator = torch.Generator().manual_seed(5)
    restored.generator = torch.Generator().manual_seed(5)
    _steps(optimizer, model, 3, seed=9)
    _steps(restored, twin, 3, seed=9)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_of_another_width_is_put_on_this_optimizers_grid_when_loaded():
    fmt = BlockFloat(8, layout="block")
    model = _model()
    eight = LowPrecisionOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), fmt, fmt, LowBitState.at(8)
    )
    _steps(eight, model, 3)
    four = LowPrecisionOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), fmt, fmt, LowBitState.at(4)
    )
    four.import_state(eight.export_state())
    for p in model.parameters():
        for name, value in four.optimizer.state[p].items():
            if name == "step":
                continue
            wanted = LowBitState.at(4).second if name == "exp_avg_sq" else LowBitState.at(4).first
            assert value.fmt == wanted  # re-encoded at 4 bits, nearest to the 8-bit values
            source = eight.optimizer.state[p][name].decode()
            nearest = quantize_state(source, dataclasses.replace(wanted, rounding="nearest"))
            assert torch.equal(value.codes, nearest.codes), name
    _steps(four, model, 2)  # and it trains on


def test_state_entries_are_not_accepted_as_model_tensors_on_the_wire():
    arrays, formats = encode_tensors(
        {"w": quantize_state(torch.randn(300), first_moment_format(8))}, FP32
    )
    assert isinstance(read_tensors(arrays, formats)["w"], QuantizedState)  # own state files
    from lowprec_fl.wire import decode_tensors

    with pytest.raises(WireFormatError, match="optimizer state, not a model tensor"):
        decode_tensors(arrays, formats)


def test_a_damaged_state_entry_is_refused_naming_it():
    arrays, formats = encode_tensors(
        {"w": quantize_state(torch.randn(300), first_moment_format(4))}, FP32
    )
    scales = dict(arrays.items())
    from flwr.app import Array, ArrayRecord

    scales["w::scales"] = Array(np.full(3, np.inf, np.float32))
    with pytest.raises(WireFormatError, match="optimizer state 'w' is invalid"):
        read_tensors(ArrayRecord(scales), formats)


@pytest.mark.parametrize("make", [torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.NAdam])
def test_an_optimizer_without_measured_low_bit_state_is_refused_by_name(make):
    fmt = BlockFloat(8, layout="block")
    with pytest.raises(TypeError, match=f"supports Adam, AdamW, SGD, not {make.__name__}"):
        LowPrecisionOptimizer(make(_model().parameters(), lr=1e-2), fmt, fmt, LowBitState.at(8))


def test_adam_with_4_bit_state_learns():
    fmt = BlockFloat(8, layout="block")
    model = _model()
    optimizer = LowPrecisionOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), fmt, fmt, LowBitState.at(4)
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("numel", [1, 127, 128, 257, 40_001])
def test_the_compiled_kernel_equals_the_torch_path_bit_for_bit(fmt, rounding, numel):
    from quantization.quantizer import torch_backend

    fmt = dataclasses.replace(fmt, rounding=rounding)
    x = _sample((numel,), fmt, seed=numel)
    if numel > 300:
        x[: fmt.block_size] = 0.0  # an all-zero block keeps scale 0
    kernel = quantize_state(x, fmt, torch.Generator().manual_seed(7))
    with torch_backend():
        reference = quantize_state(x, fmt, torch.Generator().manual_seed(7))
        reference_decoded = reference.decode()
    assert torch.equal(kernel.codes, reference.codes)
    assert torch.equal(kernel.scales, reference.scales)
    assert torch.equal(kernel.decode(), reference_decoded)
    assert torch.equal(kernel.indices, reference.indices)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_the_kernel_gives_the_same_codes_on_one_thread_and_on_several(fmt, monkeypatch):
    from quantization import _openmp

    x = _sample((300_001,), fmt, seed=11)  # several chunks of blocks
    threads = torch.get_num_threads()
    runs = []
    parallel = _openmp.openmp_parallel()
    if parallel is not None:  # count the parallel regions the encoder starts
        monkeypatch.setattr(
            _openmp, "openmp_parallel", lambda: lambda *a: runs.append(a) or parallel(*a)
        )
    try:
        torch.set_num_threads(1)
        one = quantize_state(x, fmt, torch.Generator().manual_seed(2))
        torch.set_num_threads(2)
        several = quantize_state(x, fmt, torch.Generator().manual_seed(2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.codes, several.codes) and torch.equal(one.scales, several.scales)
    assert parallel is None or [threads for *_, threads in runs] == [2]  # on two threads


@pytest.mark.parametrize("threads", [1, 2])
def test_many_tensors_in_one_call_equal_one_call_each_bit_for_bit(threads):
    # kernel formats of both widths and both roundings, a rank-1 matrix and an odd block on
    # the torch path in between, empty and one-element tensors: one shared call, same codes
    rank1 = dataclasses.replace(second_moment_format(4), normalization="rank1")
    odd_block = dataclasses.replace(first_moment_format(4), block_size=33)
    cases = [(fmt, shape) for fmt in FORMATS for shape in [(64, 3, 3, 3), (300,), (1,)]]
    cases += [
        (rank1, (256, 128)),
        (odd_block, (1000,)),
        (FORMATS[0], (0,)),
        (FORMATS[3], (40_001,)),
    ]
    tensors = [_sample(shape, fmt, seed=i) for i, (fmt, shape) in enumerate(cases)]
    fmts = [fmt for fmt, _ in cases]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        together = quantize_states(tensors, fmts, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        apart = [quantize_state(x, fmt, g) for x, fmt in zip(tensors, fmts, strict=True)]
        decoded = decode_states(together)
    finally:
        torch.set_num_threads(old)
    for a, b, d, x in zip(together, apart, decoded, tensors, strict=True):
        assert a.shape == b.shape == tuple(x.shape) and a.fmt == b.fmt
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
        assert torch.equal(d, b.decode()) and d.shape == x.shape
    assert any(q.codes.data_ptr() != q.codes.untyped_storage().data_ptr() for q in together)


def test_a_bad_tensor_among_many_is_refused_naming_its_format():
    good = _sample((500,), FORMATS[0])
    negative = -_sample((500,), FORMATS[2]).abs()
    with pytest.raises(ValueError, match=r"udynamic8/block256 stores nonnegative values"):
        quantize_states([good, negative], [FORMATS[0], FORMATS[2]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_a_diverged_state_is_refused_with_a_clear_error(bad, backend):
    from quantization.quantizer import torch_backend

    x = torch.randn(1000)
    x[517] = bad
    backend_context = torch_backend() if backend == "torch" else contextlib.nullcontext()
    with backend_context, pytest.raises(ValueError, match="NaN or inf: check the learning rate"):
        quantize_state(x, first_moment_format(8))


def test_four_bit_codes_pack_two_a_byte_in_the_wire_layout():
    from quantization.packing import unpack_codes

    fmt = first_moment_format(4)
    q = quantize_state(torch.randn(301), fmt)
    assert q.codes.numel() == 151  # 301 codes, two a byte, the last nibble padding
    signed = unpack_codes(q.codes.numpy(), 4, 301).astype(np.int64)
    assert np.array_equal(signed + 8, q.indices.numpy().astype(np.int64))
    with pytest.raises(ValueError, match="padding nibble"):
        bad = q.codes.numpy().copy()
        bad[-1] |= 0x30
        QuantizedState.from_payload(bad, q.scales.numpy(), (301,), fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_the_lookup_table_finds_the_same_codes_as_a_binary_search(fmt):
    from quantization.state_codec import _lower_index

    values = fmt.values
    low = -1.0 if fmt.signed else 0.0
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.rand(50_000, generator=g) * (1 - low) + low,
            values,  # every code, and the floats right next to each
            torch.nextafter(values, torch.tensor(2.0)),
            torch.nextafter(values, torch.tensor(-2.0)),
            torch.logspace(-30, 0, 5000) * (-1 if fmt.signed else 1),
            torch.zeros(1),
        ]
    ).clamp(low, 1.0)
    expected = (torch.searchsorted(values, x, right=True) - 1).clamp(min=0)
    assert torch.equal(_lower_index(fmt, x), expected)


def _adam_state_like(seed: int) -> tuple[list[torch.Tensor], list[StateFormat]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 3, 3, 3), (16,), (10, 300), (1,)]
    tensors, fmts = [], []
    for bits in (8, 4):
        for shape in shapes:
            tensors += [torch.randn(shape, generator=g), torch.rand(shape, generator=g) ** 4]
            fmts += [first_moment_format(bits), second_moment_format(bits)]
    return tensors, fmts


def test_an_arena_encodes_and_decodes_as_one_call_per_tensor_step_after_step():
    tensors, fmts = _adam_state_like(0)
    arena = StateArena.covering(tensors, fmts)
    assert arena is not None and arena.fits(tensors, fmts)
    mine, reference = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for step in range(3):  # the same buffers rewritten, new keys each step
        states = arena.encode(tensors, mine)
        want = quantize_states(tensors, fmts, reference)
        assert arena.holds(states) and not arena.holds(want)
        for a, b in zip(states, want, strict=True):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
        decoded = arena.decode()
        for d, w in zip(decoded, decode_states(want), strict=True):
            assert torch.equal(d, w)
        tensors = [
            d * 0.9 + 0.1 * x for d, x in zip(decoded, _adam_state_like(step + 1)[0], strict=True)
        ]
        tensors = [t.abs() if not f.signed else t for t, f in zip(tensors, fmts, strict=True)]


def test_an_arena_covers_only_what_the_kernels_take_and_refuses_bad_values():
    tensors, fmts = _adam_state_like(0)
    rank1 = dataclasses.replace(fmts[4], normalization="rank1")
    assert StateArena.covering([*tensors[:4], torch.rand(256, 128)], [*fmts[:4], rank1]) is None
    assert StateArena.covering([tensors[4].t()], [fmts[4]]) is None  # not contiguous
    assert StateArena.covering([tensors[0].double()], [fmts[0]]) is None
    arena = StateArena.covering(tensors, fmts)
    assert not arena.fits(tensors[:-1], fmts[:-1]) and not arena.fits(tensors[::-1], fmts[::-1])
    with pytest.raises(ValueError, match="encodes 16 tensors, got 15"):
        arena.encode(tensors[:-1])
    bad = [t.clone() for t in tensors]
    bad[1][3] = -1.0  # a negative second moment
    with pytest.raises(ValueError, match="stores nonnegative values"):
        arena.encode(bad)
    bad[1][3], bad[0][0, 0, 0, 0] = 1.0, float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        arena.encode(bad)


def test_the_kernel_rounds_a_block_maximum_as_the_torch_path_even_at_one_in_2_to_the_24():
    # A block's maximum normalizes to exactly 1.0, the top code. Its stochastic rounding runs
    # between the top two codes with p = 1, which still rounds down when the element's hash
    # is at least floor(p * 2^32) clamped to 4294967040 (probability 2^-24): dither key 12345
    # puts such a hash on element 1417976. Kernel and torch path must agree there too.
    from quantization import _state_kernels, state_codec
    from quantization.dither import dither_bits, split_key

    key, index = 12345, 1417976
    assert int(dither_bits(index + 1, key)[index]) >= 4294967040  # the rare hash is there
    fmt = first_moment_format(8)
    x = torch.full((index + 1,), 0.5)
    x[index] = 1.0
    reference = state_codec._encode_torch(x, tuple(x.shape), fmt, key)
    codes = torch.empty_like(reference.codes)
    scales = torch.empty_like(reference.scales)
    layout = state_codec._layout(x, codes, scales, fmt, split_key(key))
    assert _state_kernels.encode_many([layout]) == _state_kernels.STATE_OK
    assert torch.equal(codes, reference.codes) and torch.equal(scales, reference.scales)
    assert int(reference.indices[index]) == 254  # rounded down from the top code (255)
