"""Train ``nn.Conv2d`` and ``nn.Linear`` layers on integer arithmetic, without rewriting the model.

``attach_integer_arithmetic(model, precision)`` points each eligible layer's ``forward`` at an
autograd function whose forward, grad-input and grad-weight products are int8 x int8 -> int32
(``integer_ops``), and saves int8 codes, not float32 tensors, for backward. It computes the
function the fake-quant path computes (``attach_quantizers``), which stays attached: its
quantizers put every layer input and every error on a per-tensor grid, and the integer layers
read the codes off that grid. A value that is not on its grid (the model's own input, which the
reference code leaves in float32) takes the float32 route for that product, so the numbers
never depend on the route.

Where a layer or product has no integer route it falls back to float32 arithmetic on the same
grid values, with one log line per layer and reason: grouped or non-zero-padded convs, strided
convs' backward products, weights whose exponents are shared by blocks smaller than an output
channel (use ``layout="channel"`` or ``"tensor"``), non-CPU tensors, x86 CPUs without int8
dot-product instructions (VNNI or AMX: there oneDNN's int8 kernels are reference code, some 20x
slower than float32), and CPUs or torch builds where oneDNN's int8 convolution is missing or
inexact.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from . import integer_ops as ops
from .format import BlockFloat
from .grid_codes import attached_codes
from .integer_ops import Codes, ConvGeometry, codes_on_grid, integer_layout_problem
from .precision import TrainingPrecision
from .rerouting import ReroutedModules

log = logging.getLogger(__name__)


class _Route:
    """One layer's integer route: its formats, and the fallbacks it has already logged."""

    def __init__(self, name: str, precision: TrainingPrecision) -> None:
        self.name = name
        self.weight_fmt = precision.weight
        self.activation_fmt = precision.activation
        self.error_fmt = precision.error
        self.logged: set[str] = set()
        self.integer_calls = 0
        self.attached_codes = 0  # operands whose codes came with them (``grid_codes``)
        self.last_call_integer = False  # whether the latest forward product ran on integers
        self.parkable = True  # False for a weight other modules use too (tied weights)
        self.parked: Codes | None = None  # the weight's codes while it is parked (below)
        self._parked_strides: tuple[int, ...] = ()

    def park(self, weight: torch.Tensor) -> None:
        """Keep ``weight`` (a parameter) as its codes only: its data becomes a zero-stride
        placeholder of its shape holding NaN (so whatever reads a parked weight sees it at
        once), and ``parked`` holds the int8 codes and steps. Not done for a weight off its
        grid (it has no codes), nor one another module shares (it would read the NaN)."""
        if self.parked is not None or not self.parkable:
            return
        codes = codes_on_grid(weight.detach(), self.weight_fmt)
        if codes is not None:
            self.parked, self._parked_strides = codes, weight.stride()
            weight.data = weight.new_full((), math.nan).expand(weight.shape)

    def unpark(self, weight: torch.Tensor) -> None:
        """Give a parked ``weight`` its float32 values back, in its memory layout: exactly
        the values it had, since they were on the grid the codes describe."""
        if self.parked is not None:
            values = self.parked.decode().reshape(weight.shape)
            data = torch.empty_strided(
                weight.shape, self._parked_strides, dtype=weight.dtype, device=weight.device
            )
            weight.data = data.copy_(values)
            self.parked = None

    def fallback(self, reason: str) -> None:
        """Log that a product runs in float32, once per reason."""
        if reason not in self.logged:
            self.logged.add(reason)
            log.info("layer %s: float32 arithmetic (fake quantization): %s", self.name, reason)

    def codes(self, x: torch.Tensor, fmt: BlockFloat, per_channel: bool, role: str) -> Codes | None:
        """``x``'s integer codes, or None (logged) when it has none."""
        problem = integer_layout_problem(fmt, tuple(x.shape), per_channel)
        if problem is None and x.device.type != "cpu":
            problem = f"integer products run on CPU only; the {role} is on {x.device.type}"
        if problem is None:
            attached = attached_codes(x, fmt)
            if attached is not None:
                self.attached_codes += 1
                return Codes(*attached)
            codes = codes_on_grid(x, fmt)
            if codes is not None:
                return codes
            problem = f"the {role} is not on its {fmt.describe()} grid"
        self.fallback(f"{role}: {problem}")
        return None


class _IntegerConv2d(torch.autograd.Function):
    """conv2d on codes: int8 forward, int8 backward where the stride is 1."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_codes, w_codes, geometry, route):  # type: ignore[override]
        ctx.save_for_backward(x_codes.codes, x_codes.steps, w_codes.codes, w_codes.steps)
        ctx.geometry, ctx.route = geometry, route
        ctx.input_shape, ctx.weight_shape = x.shape, weight.shape
        return ops.conv2d_forward(x_codes, w_codes, bias, geometry)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_codes, x_steps, w_codes, w_steps = ctx.saved_tensors
        x, w = Codes(x_codes, x_steps), Codes(w_codes, w_steps)
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        geometry, route = ctx.geometry, ctx.route
        grad_x = grad_w = None
        dy = None
        if need_x or need_w:
            if geometry.unit_stride:
                dy = route.codes(grad, route.error_fmt, False, "error")
            else:
                route.fallback(f"backward products: stride {geometry.stride} (needs 1)")
        if dy is not None:
            if need_x:
                grad_x = ops.conv2d_grad_input(dy, w, ctx.input_shape, geometry)
            if need_w:
                grad_w = ops.conv2d_grad_weight(dy, x, ctx.weight_shape, geometry)
        elif need_x or need_w:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x.decode(), w.decode(), None, geometry.stride, geometry.padding,
                geometry.dilation, False, [0, 0], 1, [need_x, need_w, False],
            )  # fmt: skip
        grad_bias = grad.sum((0, 2, 3)) if need_bias else None
        return grad_x, grad_w, grad_bias, None, None, None, None


class _IntegerLinear(torch.autograd.Function):
    """linear on codes: int8 forward and backward; ``x`` flattened to (rows, in)."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_codes, w_codes, route):  # type: ignore[override]
        ctx.save_for_backward(x_codes.codes, x_codes.steps, w_codes.codes, w_codes.steps)
        ctx.route, ctx.input_shape = route, x.shape
        rows = Codes(x_codes.codes.reshape(-1, x.shape[-1]), x_codes.steps)
        y = ops.linear_forward(rows, w_codes, bias)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_codes, x_steps, w_codes, w_steps = ctx.saved_tensors
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        route, shape = ctx.route, ctx.input_shape
        x = Codes(x_codes.reshape(-1, shape[-1]), x_steps)
        w = Codes(w_codes, w_steps)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        # one exponent for the whole error: its codes are those of ``grad`` (handed over), as rows
        dy = route.codes(grad, route.error_fmt, False, "error") if need_x or need_w else None
        if dy is not None:
            dy = Codes(dy.codes.reshape(rows.shape), dy.steps)
            grad_x = ops.linear_grad_input(dy, w).reshape(shape) if need_x else None
            grad_w = ops.linear_grad_weight(dy, x) if need_w else None
        else:
            grad_x = (rows @ w.decode()).reshape(shape) if need_x else None
            grad_w = rows.t() @ x.decode() if need_w else None
        grad_bias = rows.sum(0) if need_bias else None
        return grad_x, grad_w, grad_bias, None, None, None


def _integer_forward(route: _Route, module: nn.Conv2d | nn.Linear) -> Callable[..., torch.Tensor]:
    """``module``'s forward on codes when its input and weight have them, else its own."""
    original = module.forward
    if isinstance(module, nn.Conv2d):
        geometry = ConvGeometry(module.stride, module.padding, module.dilation)  # type: ignore[arg-type]

        def product(x, x_codes, w_codes):
            args = (x, module.weight, module.bias, x_codes, w_codes, geometry, route)
            return _IntegerConv2d.apply(*args)
    else:

        def product(x, x_codes, w_codes):
            return _IntegerLinear.apply(x, module.weight, module.bias, x_codes, w_codes, route)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x_codes = route.codes(x, route.activation_fmt, False, "input")
        w_codes = None
        if x_codes is None:
            route.unpark(module.weight)  # the float32 route needs the values
        elif route.parked is not None:
            w_codes = route.parked
        else:
            w_codes = route.codes(module.weight, route.weight_fmt, True, "weight")
        route.last_call_integer = x_codes is not None and w_codes is not None
        if not route.last_call_integer:
            # float32 here (the first conv, on raw images): a channels-last input makes its
            # output channels-last, as the integer convs' outputs, so the model keeps one
            # memory order and elementwise ops stay on their vectorized paths. Only here:
            # converting an integer conv's input would copy it and lose its handed-over codes
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return original(x)
        route.integer_calls += 1
        return product(x, x_codes, w_codes)

    return forward


def _layer_problem(module: nn.Conv2d | nn.Linear) -> str | None:
    """Why a conv or linear layer has no integer route at all, or None."""
    if isinstance(module, nn.Linear):
        return ops.int8_products_problem()
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups})"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (needs 'zeros')"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r} (needs explicit sizes)"
    return ops.int8_conv_problem()


class IntegerArithmetic(ReroutedModules):
    """The layers ``attach_integer_arithmetic`` rerouted; ``remove()`` restores them (with
    their weights as float32 parameters).

    Between training steps their weights can be kept as int8 codes and steps only
    (``park_weights``, 1 byte a weight instead of 4): the integer products read the codes,
    and ``unpark_weights`` decodes them back, exactly, for whatever needs float32 values (the
    optimizer's step; a layer whose product falls back to float32 unparks its own). A weight
    that other modules share is never parked. Anything else that reads a parked weight
    between steps (a loss term on the weights, as FedProx's, or a mid-training
    ``state_dict()``) reads NaN: unpark first, or do not park.
    """

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, _Route] = {}
        self._layers: list[tuple[nn.Module, _Route]] = []

    def add(self, module: nn.Module, route: _Route, forward: Callable) -> None:
        """Route ``module``'s forward through ``forward``."""
        self.reroute(module, forward)
        self.routes[route.name] = route
        self._layers.append((module, route))

    @torch.no_grad()
    def park_weights(self) -> None:
        """Keep the weight of each layer whose latest product ran on integers as its codes."""
        for module, route in self._layers:
            if route.last_call_integer:
                route.park(module.weight)

    @torch.no_grad()
    def unpark_weights(self) -> None:
        """Every parked weight back as a float32 parameter (the same values)."""
        for module, route in self._layers:
            route.unpark(module.weight)

    def parked_tensors(self) -> list[torch.Tensor]:
        """The codes and steps tensors of the parked weights."""
        return [
            t
            for _, route in self._layers
            if route.parked is not None
            for t in (route.parked.codes, route.parked.steps)
        ]

    def parked_bytes(self) -> int:
        """Bytes of the parked weights' codes and steps."""
        return sum(t.nbytes for t in self.parked_tensors())

    def remove(self) -> None:
        """Unpark every weight, then give every layer its own forward back."""
        self.unpark_weights()
        super().remove()
        self._layers.clear()


def attach_integer_arithmetic(model: nn.Module, precision: TrainingPrecision) -> IntegerArithmetic:
    """Reroute every plain ``nn.Conv2d`` and ``nn.Linear`` of ``model`` onto integer products.

    Use it together with ``attach_quantizers`` (which puts inputs and errors on their grids)
    and a ``LowPrecisionOptimizer`` (which keeps weights on theirs). Layers without an integer
    route keep their float32 forward; each is logged once with the reason.
    """
    attached = IntegerArithmetic()
    uses = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    for name, module in model.named_modules():
        kind = type(module)
        if kind not in (nn.Conv2d, nn.Linear):
            continue
        route = _Route(name or kind.__name__, precision)
        problem = _layer_problem(module)  # type: ignore[arg-type]
        if problem is not None:
            route.fallback(problem)
            continue
        route.parkable = uses[id(module.weight)] == 1
        attached.add(module, route, _integer_forward(route, module))  # type: ignore[arg-type]
    return attached
