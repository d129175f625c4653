"""Server-side defences against a client whose update is well-formed but harmful.

Structural checks (names, shapes, dtypes, formats, finite values) live in ``lowprec_fl.wire``.
This module bounds what a *valid-looking* update can do to the global model:

* **Claimed weight.** A training reply's ``num-examples`` may not exceed ``max_weight``, the
  most examples any honest client can train on in a round (the largest partition's training
  split times the local epochs, see ``lowprec_fl.task.data.max_client_examples``); an
  evaluation reply's may not exceed ``max_eval_weight`` (the largest held-out split). A
  larger claim is a lie and the reply is rejected.
* **Update norm, relative to the model the clients received.** With ``delta_i = w_i - w_ref``
  (float tensors only; integer buffers are counts), a reply is rejected when
  ``||delta_i||_2 > max_norm_ratio * ||w_ref||_2``: no honest round moves a model by many times
  its own norm, while a scaled or exploded model does.
* **Norm clipping, relative to the round.** Every accepted update is scaled to at most
  ``clip_factor * median_lo_j ||delta_j||_2`` (the lower median of the round's update norms),
  ``w_i <- w_ref + delta_i * min(1, c / ||delta_i||)``, as in norm-bounding defences
  (Sun et al., 2019). One client among honest ones then moves the model no further than
  ``clip_factor`` honest clients would. With honest clients whose norms differ by less than
  ``clip_factor`` nothing is clipped and the aggregate equals the plain strategy's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

#: Integers exactly representable in float64, through which Flower averages integer arrays.
MAX_EXACT_INTEGER = 2**52


class RejectedUpdateError(ValueError):
    """An update that passed the format checks but may not be aggregated; says why."""


@dataclass(frozen=True)
class UpdateGuard:
    """Bounds on a reply's claimed weight and on its update's norm (0 or None: no bound)."""

    max_weight: float | None = None
    max_eval_weight: float | None = None
    max_norm_ratio: float = 10.0
    clip_factor: float = 4.0

    def __post_init__(self) -> None:
        for name in ("max_weight", "max_eval_weight"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if not self.max_norm_ratio >= 0:
            raise ValueError(f"max_norm_ratio must be >= 0 (0 = off), got {self.max_norm_ratio}")
        if not (self.clip_factor == 0 or self.clip_factor >= 1):
            raise ValueError(f"clip_factor must be 0 (off) or >= 1, got {self.clip_factor}")

    def check_weight(self, weight: float, training: bool = True) -> None:
        """Reject a claimed weight above ``max_weight`` (``max_eval_weight`` for evaluation)."""
        cap = self.max_weight if training else self.max_eval_weight
        if cap is not None and weight > cap:
            what = "train on" if training else "evaluate on"
            raise RejectedUpdateError(
                f"claims {weight:g} examples, more than any client can {what} in a round "
                f"({cap:g}; server.max_num_examples)"
            )

    def check_norm(
        self,
        model: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        reference_norm: float | None = None,
    ) -> float:
        """``||model - reference||_2`` over float tensors; rejects it above the ratio bound.

        ``reference_norm`` is ``model_norm(reference)`` when the caller has it already.
        """
        norm = update_norm(model, reference)
        if self.max_norm_ratio > 0:
            if reference_norm is None:
                reference_norm = model_norm(reference)
            bound = self.max_norm_ratio * max(reference_norm, 1e-12)
            if not norm <= bound:
                raise RejectedUpdateError(
                    f"update norm {norm:.4g} exceeds {self.max_norm_ratio:g} x the norm of the "
                    f"model it was trained from ({bound:.4g}; server.max_update_norm_ratio)"
                )
        return norm

    def check_buffers(
        self, model: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
    ) -> None:
        """Bounds the norm does not cover: integer buffers and BatchNorm variances.

        An integer tensor (``num_batches_tracked``) counts steps, so it may grow by at most
        ``max_weight`` (a client takes no more steps than it has examples) and never shrink;
        a ``*.running_var`` buffer is a variance and may not be negative.
        """
        step_cap = self.max_weight if self.max_weight is not None else float(MAX_EXACT_INTEGER)
        for name, value in model.items():
            if value.is_floating_point():
                if name.endswith("running_var") and bool((value < 0).any()):
                    raise RejectedUpdateError(f"{name!r} is a variance and holds negative values")
                continue
            step = (value.long() - reference[name].long()).reshape(-1)
            if step.numel() and not (int(step.min()) >= 0 and int(step.max()) <= step_cap):
                raise RejectedUpdateError(
                    f"integer buffer {name!r} moved by {int(step.abs().max())}, outside "
                    f"[0, {step_cap:g}] (a count of the steps a client took)"
                )

    def clip_threshold(self, norms: Sequence[float]) -> float:
        """``clip_factor`` times the lower median of the round's norms; inf when off."""
        if self.clip_factor == 0 or not norms:
            return math.inf
        ordered = sorted(norms)
        return self.clip_factor * ordered[(len(ordered) - 1) // 2]

    @staticmethod
    def clip(
        model: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        norm: float,
        threshold: float,
    ) -> dict[str, torch.Tensor] | None:
        """``ref + (model - ref) * threshold / norm`` when ``norm`` exceeds it, else None."""
        if not norm > threshold:
            return None
        scale = threshold / norm
        return {
            name: (reference[name] + (value - reference[name]) * scale)
            if value.is_floating_point()
            else value
            for name, value in model.items()
        }


def update_norm(model: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``model - reference`` over the floating-point tensors, in float64."""
    total = 0.0
    for name, value in model.items():
        if value.is_floating_point():
            diff = value.double() - reference[name].double()
            total += float(torch.dot(diff.reshape(-1), diff.reshape(-1)))
    return math.sqrt(total)


def model_norm(model: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the floating-point tensors, in float64."""
    return math.sqrt(
        sum(
            float(torch.dot(v.double().reshape(-1), v.double().reshape(-1)))
            for v in model.values()
            if v.is_floating_point()
        )
    )
