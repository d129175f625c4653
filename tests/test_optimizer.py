"""LowPrecisionOptimizer: weights, gradients and optimizer state live on their grids; it trains."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numba
import pytest
import torch
from torch import nn

from lowprec_fl.federated_data import load_image_data
from lowprec_fl.models import ConvNet, SmallCNN
from quantization import (
    BlockFloat,
    LowPrecisionOptimizer,
    QuantizedTensor,
    TrainingPrecision,
    attach_quantizers,
    encode,
    quantize,
)
from tests.shared_helpers import mnist_root

FMT = BlockFloat(8, layout="auto", rounding="stochastic")
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True),
    "rmsprop_centered": lambda params: torch.optim.RMSprop(
        params, lr=1e-3, momentum=0.9, centered=True
    ),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2),
}
SECOND_MOMENT = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"}  # kept as sqrt, rounded up
FIRST_MOMENT = {"momentum_buffer", "exp_avg", "grad_avg"}
MNIST_ADAM_STEPS = 300


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train single-threaded (torch and the numba kernels): on a busy 2-core runner two threads
    can be many times slower. Results do not depend on the thread count."""
    previous_torch, previous_numba = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(previous_torch)
    numba.set_num_threads(previous_numba)


def _nearest(fmt: BlockFloat) -> BlockFloat:
    return BlockFloat(fmt.bits, fmt.layout, "nearest", fmt.block_size)


def _on_grid(t: torch.Tensor, fmt: BlockFloat) -> bool:
    """Whether ``t`` is exactly representable in ``fmt`` (nearest re-quantization is a no-op)."""
    return torch.equal(quantize(t, _nearest(fmt)), t)


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Tanh()
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose pixels span four decades, so gradients (and Adam's v) span eight."""
    g = torch.Generator().manual_seed(100 + step)
    scale = torch.logspace(-4, 0, 64).view(1, 1, 8, 8)
    return torch.randn(16, 1, 8, 8, generator=g) * scale, torch.randint(0, 5, (16,), generator=g)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = _batch(step)
    return nn.functional.cross_entropy(model(x), y)


def _wrap(model: nn.Module, name: str, seed: int = 0) -> LowPrecisionOptimizer:
    return LowPrecisionOptimizer(
        OPTIMIZERS[name](list(model.parameters())),
        weight=FMT,
        grad=FMT,
        state=FMT,
        generator=torch.Generator().manual_seed(seed),
    )


def _train_step(model: nn.Module, opt: LowPrecisionOptimizer, step: int) -> None:
    opt.zero_grad()
    _loss(model, step).backward()
    opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_weights_grads_and_state_stay_on_their_grids(name):
    model = _tiny_model()
    opt = _wrap(model, name)
    params = list(model.parameters())
    assert all(_on_grid(p.detach(), FMT) for p in params)  # quantized at construction
    grads_seen: list[torch.Tensor] = []
    float_state: dict[tuple[int, str], torch.Tensor] = {}

    def before_inner_step(_opt, _args, _kwargs):
        grads_seen[:] = [p.grad.clone() for p in params]

    def after_inner_step(_opt, _args, _kwargs):  # the float state, before the wrapper rounds it
        for i, p in enumerate(params):
            for key, value in opt.optimizer.state[p].items():
                if key != "step":
                    float_state[i, key] = value.clone()

    opt.optimizer.register_step_pre_hook(before_inner_step)
    opt.optimizer.register_step_post_hook(after_inner_step)
    would_vanish = 0
    for step in range(6):
        _train_step(model, opt, step)
        assert len(grads_seen) == len(params)
        for i, p in enumerate(params):
            assert _on_grid(grads_seen[i], FMT), f"grad of param {i} not quantized before step"
            assert _on_grid(p.grad, FMT)
            assert _on_grid(p.detach(), FMT), f"param {i} off the weight grid after step {step}"
            state = opt.optimizer.state[p]
            assert state, "the wrapped optimizer kept no state"
            for key, value in state.items():
                if key == "step":
                    continue
                if key in SECOND_MOMENT:
                    reference = float_state[i, key]
                    assert _on_grid(value.sqrt(), FMT), f"sqrt({key}) of param {i} off grid"
                    assert (value[reference > 0] > 0).all(), f"{key} rounded a positive to 0"
                    # sqrt rounds up, except a block's top value that ceils past the largest
                    # code and is clamped to it (the format's code range, as for any rounding).
                    root = encode(value.sqrt(), _nearest(FMT))
                    short = value.sqrt() < reference.sqrt()
                    assert (root.codes[short] == FMT.code_max).all(), f"{key} rounded down"
                    vanished = (quantize(reference, _nearest(FMT)) == 0) & (reference > 0)
                    would_vanish += int(vanished.sum())
                else:
                    assert key in FIRST_MOMENT
                    assert _on_grid(value, FMT), f"{key} of param {i} off the state grid"
    if SECOND_MOMENT & set(opt.optimizer.state[params[0]]):
        # Rounding v itself to nearest would have zeroed entries: the property is exercised.
        assert would_vanish > 0


def test_full_precision_state_is_left_alone():
    model = _tiny_model()
    opt = LowPrecisionOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), weight=FMT, grad=FMT, state=BlockFloat(32)
    )
    _train_step(model, opt, 0)
    _train_step(model, opt, 1)
    assert all(_on_grid(p.detach(), FMT) for p in model.parameters())
    state = opt.optimizer.state[model[3].weight]
    assert not _on_grid(state["exp_avg"], FMT)
    assert not _on_grid(state["exp_avg_sq"].sqrt(), FMT)
    exported = opt.export_state()
    assert not any(isinstance(v, QuantizedTensor) for v in exported.values())


def _stateful_pair(name: str) -> tuple[nn.Module, LowPrecisionOptimizer]:
    model = _tiny_model()
    opt = _wrap(model, name, seed=5)
    for step in range(3):
        _train_step(model, opt, step)
    return model, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_export_import_reproduces_state_and_next_steps(name):
    model, opt = _stateful_pair(name)
    exported = opt.export_state()
    assert exported
    for key, value in exported.items():
        if key.endswith(".step"):
            assert isinstance(value, torch.Tensor)
        else:
            assert isinstance(value, QuantizedTensor), key
            assert value.fmt.bits == 8 and value.codes.dtype == torch.int8

    clone = _tiny_model(seed=99)  # different init: everything must come from the copies below
    clone.load_state_dict(model.state_dict())
    clone_opt = _wrap(clone, name, seed=123)
    clone_opt.import_state(exported)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        original, restored = opt.optimizer.state[p], clone_opt.optimizer.state[q]
        assert original.keys() == restored.keys()
        for key in original:
            assert torch.equal(torch.as_tensor(original[key]), torch.as_tensor(restored[key])), key

    clone_opt.generator.set_state(opt.generator.get_state())
    for step in range(3, 6):
        _train_step(model, opt, step)
        _train_step(clone, clone_opt, step)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in opt.optimizer.state[p].items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(clone_opt.optimizer.state[q][key])
            )


def test_import_state_rejects_mismatched_state():
    _, opt = _stateful_pair("adam")
    exported = opt.export_state()
    n_params = len(list(_tiny_model().parameters()))
    fresh = _wrap(_tiny_model(), "adam")
    with pytest.raises(
        ValueError, match=f"names parameter {n_params}, but the optimizer has {n_params}"
    ):
        fresh.import_state({f"{n_params}.exp_avg": exported["0.exp_avg"]})
    with pytest.raises(ValueError, match="key .-1.exp_avg. is not"):
        fresh.import_state({"-1.exp_avg": exported["0.exp_avg"]})
    with pytest.raises(
        ValueError,
        match=r"optimizer state '1.exp_avg' has shape \(4, 1, 3, 3\), parameter has \(4,\)",
    ):
        fresh.import_state({"1.exp_avg": exported["0.exp_avg"]})
    with pytest.raises(ValueError, match="has shape"):
        fresh.import_state({"0.exp_avg_sq": torch.zeros(3)})


@pytest.mark.parametrize("key", ["exp_avg", "w.exp_avg"])
def test_import_state_names_a_malformed_key(key):
    _, opt = _stateful_pair("adam")
    fresh = _wrap(_tiny_model(), "adam")
    with pytest.raises(ValueError, match=key):
        fresh.import_state({key: opt.export_state()["0.exp_avg"]})


@pytest.mark.usefixtures("one_thread")
def test_training_at_8_bits_learns_synthetic():
    torch.manual_seed(0)
    train = load_image_data("synthetic", None, train=True)
    test = load_image_data("synthetic", None, train=False)
    precision = TrainingPrecision.uniform(8)
    model = SmallCNN(in_channels=1, num_classes=10, image_size=28)
    g = torch.Generator().manual_seed(0)
    attach_quantizers(model, precision.activation, precision.error, g)
    opt = LowPrecisionOptimizer.from_precision(
        torch.optim.Adam(model.parameters(), lr=1e-3), precision, g
    )
    losses = []
    batches = train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(1))
    for _, (x, y) in zip(range(60), batches, strict=False):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 2, f"loss {first:.3f} -> {last:.3f}"
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test.batches(250, False))
    assert correct / len(test) > 0.8
    assert all(_on_grid(p.detach(), precision.weight) for p in model.parameters())


@pytest.mark.usefixtures("one_thread")
def test_adam_at_8_bits_stays_finite_on_mnist_convnet():
    data = load_image_data("mnist", mnist_root(), train=True, pad_to=32).subset(range(256))
    torch.manual_seed(0)
    model = ConvNet(in_channels=1, num_classes=10, width=32, depth=3)
    precision = TrainingPrecision.uniform(8)
    g = torch.Generator().manual_seed(0)
    attach_quantizers(model, precision.activation, precision.error, g)
    opt = LowPrecisionOptimizer.from_precision(
        torch.optim.Adam(model.parameters(), lr=1e-3), precision, g
    )
    x_all, y_all = data.normalize(data.images), data.labels
    order = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(MNIST_ADAM_STEPS):
        idx = torch.randint(0, len(data), (16,), generator=order)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()  # quantize_ raises on NaN/inf in weights, gradients or state
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    for p in model.parameters():
        assert torch.isfinite(p).all()
        assert torch.isfinite(opt.optimizer.state[p]["exp_avg_sq"]).all()


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_momentum"])
@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_state_kept_in_one_arena_trains_bit_for_bit_as_tensor_by_tensor(
    name, bits, monkeypatch, one_thread
):
    from quantization import LowBitState
    from quantization import optimizer as optimizer_module

    def run(arena: bool) -> tuple[list[torch.Tensor], dict, LowPrecisionOptimizer]:
        if not arena:
            monkeypatch.setattr(optimizer_module.StateArena, "covering", lambda *a: None)
        model = _tiny_model()
        opt = LowPrecisionOptimizer(
            OPTIMIZERS[name](list(model.parameters())), FMT, FMT, LowBitState.at(bits),
            torch.Generator().manual_seed(3),
        )  # fmt: skip
        for step in range(4):
            _train_step(model, opt, step)
            if step == 1:
                exported = opt.export_state()  # copies: later steps leave it as it was
                saved = {k: v.codes.clone() for k, v in exported.items() if hasattr(v, "codes")}
        assert all(torch.equal(exported[k].codes, c) for k, c in saved.items())
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()], opt.export_state(), opt

    weights, state, opt = run(arena=True)
    want_weights, want_state, plain = run(arena=False)
    assert opt._arena is not None and plain._arena is None  # each took its own route
    assert all(torch.equal(a, b) for a, b in zip(weights, want_weights, strict=True))
    assert state.keys() == want_state.keys()
    for key, value in state.items():
        if hasattr(value, "codes"):
            assert torch.equal(value.codes, want_state[key].codes)
            assert torch.equal(value.scales, want_state[key].scales)


def test_low_bit_state_leaves_no_float32_copy_between_steps(one_thread):
    import gc
    import weakref

    from quantization import LowBitState

    model = _tiny_model()
    opt = LowPrecisionOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), FMT, FMT, LowBitState.at(8)
    )
    for step in range(3):
        _train_step(model, opt, step)
    decoded = []  # the float32 tensors the next step decodes into
    real_decode = opt._arena.decode

    def recording_decode() -> list[torch.Tensor]:
        decoded.extend(real_decode())
        return decoded

    opt._arena.decode = recording_decode
    _train_step(model, opt, 3)
    assert opt._arena is not None and len(decoded) == 8  # Adam's 2 moments of 4 parameters
    buffers = [weakref.ref(t) for t in decoded]
    decoded.clear()
    gc.collect()
    assert all(ref() is None for ref in buffers)  # freed once encoded


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_state_of_a_parameter_without_a_gradient_is_left_as_it_was(name, monkeypatch, one_thread):
    # parameters of one shape that take turns: the arena of one step must not be reused for
    # another set of parameters while an idle one's state still lives in it
    from quantization import LowBitState
    from quantization import optimizer as optimizer_module

    def run(arena: bool) -> list[list[torch.Tensor]]:
        if not arena:
            monkeypatch.setattr(optimizer_module.StateArena, "covering", lambda *a: None)
        params = [nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(i)))
                  for i in range(3)]  # fmt: skip
        opt = LowPrecisionOptimizer(
            OPTIMIZERS[name](params), FMT, FMT, LowBitState.at(8), torch.Generator().manual_seed(1)
        )
        history = []
        for step, active in enumerate([(0, 1), (1, 2), (0, 2), (0, 1, 2)]):
            opt.zero_grad()
            for i in active:
                g = torch.Generator().manual_seed(10 * step + i)
                params[i].grad = torch.randn(300, generator=g) * (step + 1)
            before = {i: opt.optimizer.state[params[i]] for i in range(3) if i not in active}
            before = {
                i: {k: v.decode() for k, v in s.items() if k != "step"} for i, s in before.items()
            }
            opt.step()
            for i, state in before.items():
                for k, value in state.items():
                    assert torch.equal(opt.optimizer.state[params[i]][k].decode(), value)
            history.append([p.detach().clone() for p in params])
        monkeypatch.undo()
        return history

    for a, b in zip(run(arena=True), run(arena=False), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
