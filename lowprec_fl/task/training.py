"""Local low-precision training and evaluation loops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowprec_fl.federated_data import ImageData
from quantization import LowPrecisionOptimizer, TrainingPrecision
from quantization.attach import attach_low_precision


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced."""

    loss: float
    num_examples: int
    steps: int


#: Config names of the torch optimizers a client can train with, and how each is built.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, lr, momentum, weight_decay: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay
    ),
    "adamw": lambda params, lr, momentum, weight_decay: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay
    ),
    "sgd": lambda params, lr, momentum, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay
    ),
}


def make_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    precision: TrainingPrecision,
    generator: torch.Generator,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> LowPrecisionOptimizer:
    """A torch optimizer wrapped to keep weights, gradients and state in low precision."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: use one of {tuple(OPTIMIZERS)}")
    inner = OPTIMIZERS[name](model.parameters(), lr, momentum, weight_decay)
    return LowPrecisionOptimizer.from_precision(inner, precision, generator)


def train_local(
    model: nn.Module,
    optimizer: LowPrecisionOptimizer,
    data: ImageData,
    precision: TrainingPrecision,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    proximal_mu: float = 0.0,
    max_steps: int = 0,
    arithmetic: str = "fake",
) -> TrainResult:
    """Train in low precision; adds FedProx's ``mu/2 ||w - w_global||^2`` when mu > 0.

    ``arithmetic="int8"`` runs conv and linear products as integer products (the same
    function; ``quantization.integer_arithmetic``) and keeps what backward needs as int8 codes
    and ReLU masks (``quantization.compact_saved``), and the weights of its integer layers as
    int8 codes between steps; ``"fake"`` computes in float32.
    """
    model.train()
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    total_loss, seen, steps = 0.0, 0, 0
    with attach_low_precision(model, precision, generator, arithmetic) as layers:
        for _ in range(epochs):
            for images, labels in data.batches(batch_size, shuffle=True, generator=generator):
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad()
                with layers.forward():
                    loss = nn.functional.cross_entropy(model(images), labels)
                objective = loss
                if global_params:
                    drift = sum(
                        (p - g).pow(2).sum()
                        for p, g in zip(model.parameters(), global_params, strict=True)
                    )
                    objective = loss + 0.5 * proximal_mu * drift
                objective.backward()
                # int8: weights stay int8 codes between steps, except under FedProx's drift
                layers.optimizer_step(optimizer, park_weights=not global_params)
                total_loss += loss.item() * len(labels)
                seen += len(labels)
                steps += 1
                if max_steps and steps >= max_steps:
                    break
            if max_steps and steps >= max_steps:
                break
    if seen == 0:
        raise ValueError("the local training split is empty: lower partition.test_fraction")
    return TrainResult(loss=total_loss / seen, num_examples=seen, steps=steps)


@torch.no_grad()
def evaluate_model(
    model: nn.Module, data: ImageData, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``data`` in float32."""
    model.eval()
    total_loss, correct = 0.0, 0
    for images, labels in data.batches(batch_size, shuffle=False):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum())
    n = max(len(data), 1)
    return total_loss / n, correct / n
