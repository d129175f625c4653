"""The paper's ConvNet: [conv 3x3 -> instance norm -> ReLU -> 2x2 avg-pool] blocks, linear head."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("instance", "batch")


class ConvNet(nn.Module):
    """`depth` x [Conv3x3 -> norm -> ReLU -> AvgPool2d(2)], Flatten, Linear.

    ``norm="instance"`` is the paper's instance norm (``GroupNorm(width, width)``, no buffers);
    ``norm="batch"`` uses ``BatchNorm2d``, whose running statistics and counter travel with the
    model (a small model with buffers, as in FedBN-style setups).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        image_size: int = 32,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1; got depth={depth}, width={width}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width) if norm == "instance" else nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            channels, side = width, side // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for depth={depth}")
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images (N, C, H, W)."""
        return self.classifier(self.flatten(self.features(x)))
