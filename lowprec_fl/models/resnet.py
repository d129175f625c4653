"""ResNet-18 adapted to 32x32 inputs (CIFAR-style stem)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18


def resnet18_cifar(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Torchvision ResNet-18 with a 3x3 stride-1 stem conv and no max-pool, for 32x32 images."""
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
