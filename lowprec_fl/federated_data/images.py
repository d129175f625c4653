"""In-memory image datasets kept as uint8 tensors and normalised per batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IndexLike = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image set: uint8 images (N, C, H, W), int64 labels and normalisation stats."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def __post_init__(self) -> None:
        """Validate shapes and dtypes so that errors surface at construction time."""
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W); got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(f"labels must be an int64 tensor (N,); got {self.labels.dtype}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive; got {self.std}")
        if self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"images must be square; got {tuple(self.images.shape[2:])}")

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0])

    @property
    def num_channels(self) -> int:
        """Number of image channels C."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side length H (= W) of the square images."""
        return int(self.images.shape[2])

    def subset(self, indices: IndexLike) -> ImageData:
        """Return the samples at `indices` (a copy) with the same statistics."""
        array = np.asarray(indices)
        if array.dtype == bool:
            array = np.flatnonzero(array)
        idx = torch.as_tensor(array, dtype=torch.int64)
        return ImageData(
            images=self.images[idx],
            labels=self.labels[idx],
            mean=self.mean,
            std=self.std,
            num_classes=self.num_classes,
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Convert uint8 images to float32 `(x / 255 - mean) / std`, per channel."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        scale = 1.0 / (255.0 * std)
        shift = mean / std
        return images.to(torch.float32).mul_(scale).sub_(shift)

    def batches(
        self,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (float32 normalised images, int64 labels) mini-batches."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                x, y = self.images[start:end], self.labels[start:end]
            else:
                idx = order[start:end]
                x, y = self.images[idx], self.labels[idx]
            yield self.normalize(x), y
