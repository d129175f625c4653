"""A small, fast CNN for demos and tests."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv(16) -> ReLU -> AvgPool -> Conv(32) -> ReLU -> AvgPool -> Flatten -> Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        side = image_size // 2 // 2
        if side < 1:
            raise ValueError(f"image_size must be >= 4; got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(32 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images (N, C, H, W)."""
        return self.classifier(self.flatten(self.features(x)))
