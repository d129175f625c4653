"""Low-precision optimizer: quantized gradients, weights and state around any torch optimizer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .codec import QuantizedTensor, encode
from .format import BlockFloat
from .precision import TrainingPrecision
from .quantizer import quantize_, quantize_many_
from .state_codec import (
    LowBitState,
    QuantizedState,
    StateArena,
    StateFormat,
    decode_states,
    quantize_state,
    quantize_states,
)

#: Optimizer state that divides the update (Adam/AdamW, RMSprop, Adagrad): kept as sqrt, rounded up.
SECOND_MOMENT_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


#: Optimizers whose state low-bit formats are measured for (first and second moments).
LOW_BIT_STATE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


class LowPrecisionOptimizer:
    """Wraps a torch optimizer (SGD, Adam, AdamW, ...) so training never keeps a float32 copy.

    ``step()`` quantizes each gradient, runs the wrapped optimizer, then quantizes each weight and
    every floating-point state tensor (momentum, exp_avg, exp_avg_sq, ...). Step counters stay as
    they are. Like QPyTorch's ``OptimLP``, with optimizer state quantized too.

    ``state``: a ``LowBitState`` keeps the state as ``QuantizedState`` codes and scales between
    steps (decoded for the wrapped step only); a ``BlockFloat`` keeps it as float32 tensors on
    the weight grid, second moments (which divide the update: a small entry rounded to zero
    turns a tiny gradient into a step of ``lr * m / eps``) as their square root rounded up;
    ``FP32`` leaves it alone.

    Low-bit state lives in one arena (``StateArena``) whose codes each step rewrites in place,
    as torch's optimizers update their float32 state in place: a ``state_dict()`` of the
    wrapped optimizer refers to live state; ``export_state()`` copies.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weight: BlockFloat,
        grad: BlockFloat,
        state: BlockFloat | LowBitState,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(state, LowBitState) and not isinstance(optimizer, LOW_BIT_STATE_OPTIMIZERS):
            names = ", ".join(cls.__name__ for cls in LOW_BIT_STATE_OPTIMIZERS)
            raise TypeError(
                f"low-bit optimizer state supports {names}, not {type(optimizer).__name__}: "
                "use one of those, or a BlockFloat (or FP32) state format"
            )
        self.optimizer = optimizer
        self.weight_fmt = weight
        self.grad_fmt = grad
        self.state_fmt = state
        self.generator = generator
        self._arena: StateArena | None = None  # low-bit state's buffers, kept between steps
        self.quantize_weights()

    @classmethod
    def from_precision(
        cls,
        optimizer: torch.optim.Optimizer,
        precision: TrainingPrecision,
        generator: torch.Generator | None = None,
    ) -> LowPrecisionOptimizer:
        """Wrap ``optimizer`` with the weight, gradient and state formats of ``precision``."""
        return cls(optimizer, precision.weight, precision.grad, precision.state, generator)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups."""
        return self.optimizer.param_groups

    def _params(self) -> Iterator[torch.nn.Parameter]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    @torch.no_grad()
    def quantize_weights(self) -> None:
        """Put every parameter onto the weight grid (done at construction and after each step)."""
        quantize_many_([p.data for p in self._params()], self.weight_fmt, self.generator)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One low-precision step: w <- Q_w(step(w, Q_g(grad))), state <- Q_s(state).

        A ``closure`` is evaluated first (with gradients enabled), so the gradients it
        computes are the ones quantized. Low-bit state is decoded for the step only: between
        steps the optimizer's state holds ``QuantizedState`` codes and scales.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for p in self._params() if p.grad is not None]
        quantize_many_(grads, self.grad_fmt, self.generator)
        low_bit = isinstance(self.state_fmt, LowBitState)
        stepped = [p for p in self._params() if p.grad is not None]
        if low_bit:
            self._decode_state(stepped)
        self.optimizer.step()
        self.quantize_weights()
        if low_bit:
            self._encode_state(stepped)
        elif self.state_fmt.enabled:
            for p in self._params():
                state = self.optimizer.state.get(p, {})
                for name, value in state.items():
                    if _is_quantizable_state(name, value):
                        state[name] = self._quantize_state(name, value)
        return loss

    def _decode_state(self, params: list[torch.nn.Parameter]) -> None:
        """Replace the codes of ``params``' state by float32 tensors, for the wrapped step (all
        in one kernel call on the CPU)."""
        entries = self._state_entries(
            params, lambda _name, value: isinstance(value, QuantizedState)
        )
        values = [state[name] for _, state, name in entries]
        arena = self._arena
        if arena is not None and arena.holds(values):
            decoded = arena.decode()
        else:
            # some state stays in the arena's codes (a parameter without a gradient this
            # step, or imported state): its buffers must not be rewritten, so start anew
            self._arena = None
            decoded = decode_states(values)
        for (p, state, name), tensor in zip(entries, decoded, strict=True):
            state[name] = tensor.to(p.device)

    def _state_entries(
        self, params: list[torch.nn.Parameter], keep: Callable[[str, object], bool]
    ) -> list[tuple[torch.nn.Parameter, dict[str, Any], str]]:
        """(parameter, its state dict, name) of each state entry ``keep`` accepts, in the
        order of parameters and their state (the order dither keys are drawn in)."""
        return [
            (p, state, name)
            for p in params
            for state in [self.optimizer.state.get(p, {})]
            for name, value in state.items()
            if keep(name, value)
        ]

    def _encode_state(self, params: list[torch.nn.Parameter]) -> None:
        """Replace ``params``' floating-point state by low-bit codes, all in one kernel call on
        the CPU; dither keys are drawn in the order of parameters and their state."""
        entries = self._state_entries(params, _is_quantizable_state)
        values = [state[name] for _, state, name in entries]
        fmts = [self._low_bit_format(name) for *_, name in entries]
        arena = self._arena
        if arena is None or not arena.fits(values, fmts):
            arena = StateArena.covering(values, fmts)
        self._arena = None  # until it holds this step's codes
        if arena is None:
            encoded = quantize_states(values, fmts, self.generator)
        else:
            encoded = arena.encode(values, self.generator)
            self._arena = arena
        for (_, state, name), q in zip(entries, encoded, strict=True):
            state[name] = q

    def _quantize_state(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """BFP state: on the weight grid; second moments as their square root, rounded up."""
        if name in SECOND_MOMENT_STATE:
            root = quantize_(value.sqrt(), _with_rounding(self.state_fmt, "up"))
            return value.copy_(root.square_())
        return quantize_(value, self.state_fmt, self.generator)

    def _low_bit_format(self, name: str) -> StateFormat:
        """The state format of a state tensor: second moments get theirs."""
        state = self.state_fmt
        return state.second if name in SECOND_MOMENT_STATE else state.first

    def export_state(self) -> dict[str, QuantizedTensor | QuantizedState | torch.Tensor]:
        """Optimizer state keyed ``"<param index>.<name>"``: quantized tensors as codes.

        BFP state as ``QuantizedTensor`` (second moments as their square root), low-bit state
        as ``QuantizedState``; its values are already on their grid, so encoding is exact.
        """
        exported: dict[str, QuantizedTensor | QuantizedState | torch.Tensor] = {}
        for index, p in enumerate(self._params()):
            for name, value in self.optimizer.state.get(p, {}).items():
                key = f"{index}.{name}"
                if isinstance(value, QuantizedState):
                    exported[key] = value.clone()  # the next step rewrites the arena's codes
                    continue
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                if isinstance(self.state_fmt, LowBitState) and _is_quantizable_state(name, value):
                    exported[key] = _codes_on_grid(value, self._low_bit_format(name))
                elif self.state_fmt.enabled and _is_quantizable_state(name, value):
                    stored = value.sqrt() if name in SECOND_MOMENT_STATE else value
                    exported[key] = encode(stored, _with_rounding(self.state_fmt, "nearest"))
                else:
                    exported[key] = value.detach().clone()
        return exported

    def import_state(
        self, exported: dict[str, QuantizedTensor | QuantizedState | torch.Tensor]
    ) -> None:
        """Restore state written by ``export_state`` (same parameters, same order).

        Low-bit state in this optimizer's format is kept as the codes it arrived in; state of
        another format is put on this optimizer's grid (nearest rounding).
        """
        params = list(self._params())
        restored: list[tuple[torch.nn.Parameter, str, torch.Tensor, QuantizedState | None]] = []
        for key, value in exported.items():
            index_text, _, name = key.partition(".")
            if not index_text.isdigit() or not name:
                raise ValueError(
                    f"optimizer state key {key!r} is not '<parameter index>.<state name>'"
                )
            index = int(index_text)
            if not 0 <= index < len(params):
                raise ValueError(
                    f"optimizer state key {key!r} names parameter {index}, "
                    f"but the optimizer has {len(params)}"
                )
            tensor = value
            codes = None
            if isinstance(value, QuantizedState):
                tensor = value.decode()
                codes = value
            elif isinstance(value, QuantizedTensor):
                tensor = value.decode()
                if name in SECOND_MOMENT_STATE:
                    tensor = tensor.square()
            p = params[index]
            if name != "step" and tensor.shape != p.shape:
                raise ValueError(
                    f"optimizer state {key!r} has shape {tuple(tensor.shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"optimizer state {key!r} holds NaN or inf")
            if name == "step" and (tensor.numel() != 1 or float(tensor) < 0):
                raise ValueError(f"optimizer state {key!r} is not a step count")
            restored.append((p, name, tensor, codes))
        for index, names in _names_by_param(restored, params).items():
            expected = _expected_state(self.optimizer, params[index])
            if expected is not None and names != expected:
                raise ValueError(
                    f"optimizer state of parameter {index} holds {sorted(names)}, but "
                    f"{type(self.optimizer).__name__} keeps {sorted(expected)} (state of "
                    "another optimizer?)"
                )
        # Checked everything first: a bad entry leaves the optimizer's state untouched.
        for p, name, tensor, codes in restored:
            if isinstance(self.state_fmt, LowBitState) and _is_quantizable_state(name, tensor):
                fmt = self._low_bit_format(name)
                if codes is None or codes.fmt != fmt:
                    codes = _codes_on_grid(tensor, fmt)
                self.optimizer.state[p][name] = codes
            else:
                self.optimizer.state[p][name] = tensor.to(self._state_device(p, name)).clone()

    def _state_device(self, p: torch.nn.Parameter, name: str) -> torch.device:
        # torch keeps step counters on the CPU unless the optimizer is capturable or fused
        if name == "step":
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            if not (group.get("capturable") or group.get("fused")):
                return torch.device("cpu")
        return p.device


def _names_by_param(restored: list[tuple], params: list) -> dict[int, set[str]]:
    index_of = {id(p): i for i, p in enumerate(params)}
    names: dict[int, set[str]] = {}
    for p, name, *_ in restored:
        names.setdefault(index_of[id(p)], set()).add(name)
    return names


def _expected_state(optimizer: torch.optim.Optimizer, p: torch.nn.Parameter) -> set[str] | None:
    """The state names torch's Adam, AdamW and SGD keep for a parameter; None for others."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return {"step", "exp_avg", "exp_avg_sq"} | (
            {"max_exp_avg_sq"} if group["amsgrad"] else set()
        )
    if type(optimizer) is torch.optim.SGD:
        return {"momentum_buffer"} if group["momentum"] else set()
    return None


def _codes_on_grid(x: torch.Tensor, fmt: StateFormat) -> QuantizedState:
    """``x``'s nearest codes in ``fmt``, labelled with ``fmt`` itself (its rounding is how
    future steps round; a value already on the grid encodes exactly either way)."""
    nearest = quantize_state(x, dataclasses.replace(fmt, rounding="nearest"))
    return dataclasses.replace(nearest, fmt=fmt)


def _is_quantizable_state(name: str, value: object) -> bool:
    return (
        name != "step"
        and isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.numel() > 0
    )


def _with_rounding(fmt: BlockFloat, rounding: str) -> BlockFloat:
    """``fmt`` with another rounding mode (same grid)."""
    return BlockFloat(fmt.bits, fmt.layout, rounding, fmt.block_size)  # type: ignore[arg-type]
