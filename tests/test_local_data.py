"""A device's own images (``--node-config data-dir=...``): layouts, labels, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lowprec_fl.federated_data import load_image_data
from lowprec_fl.federated_data.local_folder import LocalDataError, load_local_folder
from lowprec_fl.task.config import load_config
from lowprec_fl.task.data import node_data
from tests.shared_helpers import mnist_root, write_image_folder


@pytest.fixture(scope="module")
def mnist():
    return load_image_data("mnist", mnist_root(), train=True)


def test_an_image_folder_keeps_the_dataset_labels_pixels_and_statistics(mnist, tmp_path):
    folder = write_image_folder(mnist, (7, 3), 4, tmp_path / "images")
    data = load_local_folder("mnist", folder, pad_to=None)
    assert data.labels.tolist() == [3] * 4 + [7] * 4  # labels are the folders' class indices
    expected = [i for c in (3, 7) for i in np.flatnonzero(mnist.labels.numpy() == c)[:4]]
    assert torch.equal(data.images, mnist.images[torch.tensor(expected)])  # PNG is lossless
    assert (data.mean, data.std, data.num_classes) == (mnist.mean, mnist.std, 10)


def test_an_image_folder_is_padded_like_the_dataset(mnist, tmp_path):
    folder = write_image_folder(mnist, (1,), 2, tmp_path / "images")
    assert load_local_folder("mnist", folder, pad_to=32).images.shape == (2, 1, 32, 32)


def test_a_folder_in_the_torchvision_layout_gives_its_whole_training_split():
    data = load_local_folder("MNIST", mnist_root(), pad_to=None)
    assert len(data) == 60_000


def test_colour_images_are_converted_to_the_dataset_channels(tmp_path):
    (tmp_path / "4").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "4" / "a.jpg", quality=95)
    data = load_local_folder("mnist", tmp_path, pad_to=None)
    assert data.images.shape == (1, 1, 28, 28) and data.labels.tolist() == [4]


def test_node_data_holds_out_the_configured_fraction_of_everything(mnist, tmp_path):
    folder = write_image_folder(mnist, (0, 1, 2), 10, tmp_path / "images")
    cfg = load_config({"overrides": "partition.test_fraction=0.2"})
    train, held_out = node_data(cfg, folder)
    assert (len(train), len(held_out)) == (24, 6)
    assert (
        sorted(train.labels.tolist() + held_out.labels.tolist()) == [0] * 10 + [1] * 10 + [2] * 10
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing", "is not a folder"),
        (lambda p: (p / "cats").mkdir() or p, r"\['cats'\] are not class indices 0..9"),
        (lambda p: (p / "10").mkdir() or p, r"not class indices 0..9"),
        (lambda p: (p / "3").mkdir() or p, "holds no images"),
        (lambda p: _image(p, (30, 30)), "30x30 pixels; MNIST images are 28x28"),
        (lambda p: _broken(p), "is not a readable image"),
        (lambda p: (p / "MNIST" / "raw").mkdir(parents=True) or p, "is incomplete or damaged"),
    ],
)
def test_a_broken_folder_gets_an_error_naming_the_fix(tmp_path, make, match):
    with pytest.raises(LocalDataError, match=match):
        load_local_folder("mnist", make(tmp_path), pad_to=None)


def test_a_synthetic_dataset_cannot_come_from_a_folder(tmp_path):
    with pytest.raises(LocalDataError, match="dataset.name='synthetic'"):
        load_local_folder("synthetic", tmp_path, pad_to=None)


def _image(root, size):
    (root / "5").mkdir()
    Image.fromarray(np.zeros(size, dtype=np.uint8)).save(root / "5" / "x.png")
    return root


def _broken(root):
    (root / "5").mkdir()
    (root / "5" / "x.png").write_bytes(b"not a png")
    return root
