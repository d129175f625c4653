"""A device's own images, read whole from a folder: what a deployed SuperNode trains on.

Two layouts are accepted (``--node-config "data-dir='/data/images'"``):

* **one subfolder per class**, as torchvision's ``ImageFolder`` expects, each named by the
  class index in the configured dataset (``0/``, ``1/``, ... ``9/`` for MNIST), holding image
  files (PNG, JPEG, ...) of the dataset's size and channels. A device may hold any subset of
  the classes; the names keep its labels those of the federation's model.
* **the dataset's own torchvision layout** (e.g. ``MNIST/raw/`` below the folder): its
  training split.

Images are normalised with the dataset's statistics, as every other party normalises them.
"""

from __future__ import annotations

import functools
import os
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common import log
from PIL import Image, UnidentifiedImageError

from lowprec_fl.federated_data.images import ImageData
from lowprec_fl.federated_data.loading import _SPECS, _pad, _Spec, _torchvision, dataset_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")


class LocalDataError(ValueError):
    """A device's data folder cannot be read as the configured dataset; says what to fix."""


def load_local_folder(name: str, folder: str | os.PathLike[str], pad_to: int | None) -> ImageData:
    """All images in ``folder`` as ``ImageData`` of dataset ``name`` (see the module docs).

    Read once per process (a ClientApp process serves one run) and logged with its class counts.
    """
    return _load_cached(dataset_key(name), os.path.abspath(os.path.expanduser(folder)), pad_to)


@functools.lru_cache(maxsize=4)
def _load_cached(key: str, folder: str, pad_to: int | None) -> ImageData:
    if key not in _SPECS:
        raise LocalDataError(
            f"a data folder holds images of one of the datasets {tuple(_SPECS)}; the run "
            f"config has dataset.name={key!r}"
        )
    spec = _SPECS[key]
    path = Path(folder)
    if not path.is_dir():
        raise LocalDataError(
            f"data-dir {folder!r} is not a folder on this SuperNode: point "
            "--node-config data-dir at the folder with one subfolder per class"
        )
    if (path / spec.folder).is_dir():
        try:
            data = _torchvision(key, str(path), train=True, download=False)
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            raise LocalDataError(
                f"{path / spec.folder} is incomplete or damaged ({err}): data-dir must hold the "
                f"whole {spec.tv_class} training split there, or one subfolder per class"
            ) from None
    else:
        data = _image_folder(path, spec)
    counts = np.bincount(data.labels.numpy(), minlength=spec.num_classes)
    held = {int(c): int(counts[c]) for c in np.flatnonzero(counts)}
    log(INFO, "Local data: %d %s images in %s, per class %s", len(data), spec.tv_class, path, held)
    return _pad(data, pad_to) if pad_to is not None else data


def _image_folder(path: Path, spec: _Spec) -> ImageData:
    """Images of ``path/<class index>/*``, labelled by their folder's name."""
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    wrong = [p.name for p in classes if not _is_class_index(p.name, spec.num_classes)]
    if wrong:
        raise LocalDataError(
            f"{path}: subfolders {wrong[:5]} are not class indices 0..{spec.num_classes - 1} "
            f"of {spec.tv_class}: name each class's folder by its index (e.g. {path}/3/)"
        )
    files = [
        (f, int(c.name))
        for c in classes
        for f in sorted(c.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise LocalDataError(
            f"{path} holds no images: expected {spec.tv_class} images ({', '.join(IMAGE_SUFFIXES)})"
            f" in one subfolder per class, e.g. {path}/3/0001.png, or {path}/{spec.folder}/"
        )
    images = np.stack([_read(f, spec) for f, _ in files])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    tensor = torch.from_numpy(images)
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    return ImageData(tensor.contiguous(), labels, spec.mean, spec.std, spec.num_classes)


def _is_class_index(name: str, num_classes: int) -> bool:
    return name.isdigit() and int(name) < num_classes


def _read(file: Path, spec: _Spec) -> np.ndarray:
    """One image as uint8 (H, W) or (H, W, 3), in the dataset's channels and size."""
    try:
        with Image.open(file) as image:
            pixels = np.asarray(image.convert("L" if spec.channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise LocalDataError(f"{file} is not a readable image: {err}") from None
    if pixels.shape[:2] != (spec.side, spec.side):
        raise LocalDataError(
            f"{file} is {pixels.shape[1]}x{pixels.shape[0]} pixels; {spec.tv_class} images are "
            f"{spec.side}x{spec.side}: resize the device's images to that size"
        )
    return pixels
