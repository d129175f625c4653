"""Model zoo: the paper's ConvNet, a CIFAR ResNet-18 and a small demo CNN."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.convnet import ConvNet
from models.resnet import resnet18_cifar
from models.small_cnn import SmallCNN

MODEL_NAMES: tuple[str, ...] = ("convnet", "resnet18", "small_cnn")


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any
) -> nn.Module:
    """Build model `name` for images of `in_channels` x `image_size`^2 and `num_classes` classes."""
    if name == "convnet":
        return ConvNet(in_channels, num_classes, image_size=image_size, **kwargs)
    if name == "resnet18":
        return resnet18_cifar(in_channels, num_classes, **kwargs)
    if name == "small_cnn":
        return SmallCNN(in_channels, num_classes, image_size=image_size, **kwargs)
    raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


__all__ = ["MODEL_NAMES", "ConvNet", "SmallCNN", "build_model", "resnet18_cifar"]
