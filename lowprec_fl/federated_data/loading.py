"""Load image datasets (torchvision or synthetic) into uint8 `ImageData`, cached per process."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lowprec_fl.federated_data.images import ImageData

DEFAULT_DATA_ROOT = "~/.cache/lowprec-fl/data"
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0
SYNTHETIC_TRAIN_SIZE = 2000
SYNTHETIC_TEST_SIZE = 500


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither on disk under the data root nor downloadable."""


@dataclass(frozen=True)
class _Spec:
    tv_class: str  # torchvision.datasets class name
    folder: str  # what torchvision expects below the root
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    side: int  # images are side x side


_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_SPECS: dict[str, _Spec] = {
    "mnist": _Spec("MNIST", "MNIST/raw", 10, (0.1307,), (0.3081,), 1, 28),
    "fashion_mnist": _Spec("FashionMNIST", "FashionMNIST/raw", 10, (0.2860,), (0.3530,), 1, 28),
    "cifar10": _Spec("CIFAR10", "cifar-10-batches-py", 10, *_CIFAR10_STATS, 3, 32),
    "cifar100": _Spec("CIFAR100", "cifar-100-python", 100, *_CIFAR100_STATS, 3, 32),
}
#: Synthetic sets (no download): name -> (channels, side), MNIST's and CIFAR's shapes.
_SYNTHETIC_SHAPES: dict[str, tuple[int, int]] = {"synthetic": (1, 28), "synthetic_rgb": (3, 32)}
DATASET_NAMES: tuple[str, ...] = (*_SPECS, *_SYNTHETIC_SHAPES)


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> str:
    """Absolute data root: `root` if given (non-empty), else env DATA_ROOT, else the cache dir."""
    chosen = os.fspath(root) if root else os.environ.get("DATA_ROOT") or DEFAULT_DATA_ROOT
    return os.path.abspath(os.path.expanduser(chosen))


def dataset_key(name: str) -> str:
    """The canonical spelling of a dataset name (``Fashion-MNIST`` -> ``fashion_mnist``)."""
    return name.lower().replace("-", "_")


def load_image_data(
    name: str, root: str | None, train: bool, pad_to: int | None = None
) -> ImageData:
    """Load the train or test split of dataset `name` as uint8 `ImageData` (cached per process).

    The cached object is shared by every caller in the process: use `subset` (which copies)
    rather than modifying its tensors in place.
    """
    key = dataset_key(name)
    if key not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if pad_to is not None and pad_to < 1:
        raise ValueError(f"pad_to must be a positive image size or None; got {pad_to}")
    resolved = "" if key in _SYNTHETIC_SHAPES else resolve_data_root(root)
    return _load_cached(key, resolved, bool(train), pad_to)


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, root: str, train: bool, pad_to: int | None) -> ImageData:
    if name in _SYNTHETIC_SHAPES:
        data = _synthetic(train, *_SYNTHETIC_SHAPES[name])
    else:
        data = _torchvision(name, root, train)
    return _pad(data, pad_to) if pad_to is not None else data


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily set the default socket timeout so offline downloads fail fast."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision(name: str, root: str, train: bool, download: bool = True) -> ImageData:
    import torchvision.datasets as tvd

    spec = _SPECS[name]
    dataset_class = getattr(tvd, spec.tv_class)
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
            ds = dataset_class(root=root, train=train, download=download)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        if not download:
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetUnavailableError(
            f"Dataset {name!r} ({spec.tv_class}) is not available under data root {root!r} "
            f"(expected {os.path.join(root, spec.folder)}) and could not be downloaded: "
            f"{reason}. Fix: set the config key dataset.root (or the environment variable "
            f"DATA_ROOT) to a folder that holds {spec.tv_class} in torchvision layout, or go "
            f"online so torchvision can download it."
        ) from exc
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return ImageData(
        images=images.contiguous(),
        labels=labels,
        mean=spec.mean,
        std=spec.std,
        num_classes=spec.num_classes,
    )


def _pad(data: ImageData, pad_to: int) -> ImageData:
    """Zero-pad images symmetrically to `pad_to` x `pad_to` (e.g. 28 -> 32)."""
    size = data.image_size
    if pad_to < size:
        raise ValueError(f"pad_to={pad_to} is smaller than the image size {size}")
    if pad_to == size:
        return data
    before = (pad_to - size) // 2
    after = pad_to - size - before
    images = F.pad(data.images, (before, after, before, after), mode="constant", value=0)
    return ImageData(images, data.labels, data.mean, data.std, data.num_classes)


def _synthetic(train: bool, channels: int = 1, side: int = 28) -> ImageData:
    """Deterministic 10-class ``channels x side x side`` set: a blocky random prototype per
    class plus noise (1x28x28 like MNIST, or 3x32x32 like CIFAR)."""
    num_classes, block = 10, 4
    proto_rng = np.random.default_rng(12345)
    coarse = proto_rng.random((num_classes, channels, side // block, side // block)) < 0.4
    prototypes = np.kron(coarse, np.ones((block, block))) * 170.0 + 40.0
    train_images, train_labels = _synthetic_split(prototypes, SYNTHETIC_TRAIN_SIZE, seed=1)
    axes = (0, 2, 3)  # per-channel statistics, as the torchvision specs give them
    mean = tuple(round(float(m), 4) for m in train_images.mean(axis=axes) / 255.0)
    std = tuple(round(float(s), 4) for s in train_images.std(axis=axes) / 255.0)
    if train:
        images, labels = train_images, train_labels
    else:
        images, labels = _synthetic_split(prototypes, SYNTHETIC_TEST_SIZE, seed=2)
    return ImageData(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        mean=mean,
        std=std,
        num_classes=num_classes,
    )


def _synthetic_split(prototypes: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(prototypes)).astype(np.int64)
    noisy = prototypes[labels] + rng.normal(0.0, 45.0, size=(n, *prototypes.shape[1:]))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), labels
