"""Tests for federated_data: loading, ImageData batching and partitioning."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from lowprec_fl.federated_data import (
    BalancedDirichletPartitioner,
    DatasetUnavailableError,
    ImageData,
    label_histogram,
    load_image_data,
    partition_indices,
    resolve_data_root,
    train_test_split_indices,
)
from tests.shared_helpers import mnist_root


@pytest.fixture(scope="module")
def mnist_train() -> ImageData:
    return load_image_data("mnist", mnist_root(), train=True)


@pytest.fixture(scope="module")
def mnist_labels(mnist_train: ImageData) -> np.ndarray:
    return mnist_train.labels.numpy()


# --- loading -----------------------------------------------------------------------------


def test_mnist_shapes_dtypes_and_labels(mnist_train: ImageData) -> None:
    test = load_image_data("mnist", mnist_root(), train=False)
    assert mnist_train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert mnist_train.images.dtype == torch.uint8
    assert mnist_train.labels.dtype == torch.int64
    assert mnist_train.labels.min() == 0 and mnist_train.labels.max() == 9
    assert torch.bincount(mnist_train.labels).min() > 5000
    assert (mnist_train.num_classes, mnist_train.num_channels, mnist_train.image_size) == (
        1 * 10,
        1,
        28,
    )
    assert mnist_train.mean == (0.1307,) and mnist_train.std == (0.3081,)


def test_mnist_is_cached_per_process(mnist_train: ImageData) -> None:
    assert load_image_data("mnist", mnist_root(), train=True) is mnist_train


def test_data_root_env_is_used(monkeypatch: pytest.MonkeyPatch, mnist_train: ImageData) -> None:
    monkeypatch.setenv("DATA_ROOT", mnist_root())
    assert load_image_data("mnist", None, train=True) is mnist_train
    assert resolve_data_root(None) == os.path.abspath(mnist_root())
    assert resolve_data_root("/some/where") == "/some/where"
    monkeypatch.delenv("DATA_ROOT")
    assert resolve_data_root("").endswith(os.path.join(".cache", "lowprec-fl", "data"))


def test_pad_to_32_zero_pads_symmetrically(mnist_train: ImageData) -> None:
    padded = load_image_data("mnist", mnist_root(), train=True, pad_to=32)
    assert padded.images.shape == (60000, 1, 32, 32) and padded.image_size == 32
    assert torch.equal(padded.images[:, :, 2:30, 2:30], mnist_train.images)
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.max()) == 0
    assert torch.equal(padded.labels, mnist_train.labels)
    with pytest.raises(ValueError, match="smaller"):
        load_image_data("mnist", mnist_root(), train=True, pad_to=20)


def test_batches_are_normalised(mnist_train: ImageData) -> None:
    x, y = next(mnist_train.batches(8192, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.dtype == torch.float32 and x.shape == (8192, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (8192,)
    assert abs(float(x.mean())) < 0.05
    assert abs(float(x.std()) - 1.0) < 0.05
    expected = (mnist_train.images[:3].float() / 255 - 0.1307) / 0.3081
    first, _ = next(mnist_train.batches(3, shuffle=False))
    torch.testing.assert_close(first, expected)


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match=r"mnist.*cifar10.*synthetic"):
        load_image_data("imagenet", None, train=True)


def test_offline_cifar10_raises_actionable_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise OSError("network disabled by the test")

    # Never download 170 MB even on a machine that happens to be online.
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(DatasetUnavailableError) as info:
        load_image_data("cifar10", str(tmp_path), train=True)
    message = str(info.value)
    assert "dataset.root" in message and "DATA_ROOT" in message
    assert str(tmp_path) in message and "CIFAR10" in message
    assert isinstance(info.value, RuntimeError)


# --- ImageData ---------------------------------------------------------------------------


def _tiny(n: int = 10) -> ImageData:
    images = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8)
    return ImageData(
        images=images.view(n, 3, 4, 4),
        labels=torch.arange(n, dtype=torch.int64) % 3,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.5),
        num_classes=3,
    )


def test_batches_cover_every_sample_once_and_respect_drop_last() -> None:
    base = _tiny(10)
    data = ImageData(base.images, torch.arange(10), base.mean, base.std, num_classes=10)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    expected = (data.images.float() / 255 - mean) / std
    gen = torch.Generator().manual_seed(1)
    batches = list(data.batches(4, shuffle=True, generator=gen))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    ids = torch.cat([y for _, y in batches])
    assert sorted(ids.tolist()) == list(range(10)) and ids.tolist() != list(range(10))
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), expected[ids])
    assert [len(y) for _, y in data.batches(4, shuffle=False, drop_last=True)] == [4, 4]
    ordered = torch.cat([x for x, _ in data.batches(4, shuffle=False)])
    torch.testing.assert_close(ordered, expected)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(0, shuffle=False))


def test_shuffle_is_seeded() -> None:
    data = _tiny(10)

    def labels(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in data.batches(3, True, gen)]).tolist()

    assert labels(0) == labels(0)
    assert labels(0) != labels(1) or labels(0) != labels(2)


def test_subset_and_validation() -> None:
    data = _tiny(10)
    sub = data.subset(np.array([7, 2]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 2]
    assert torch.equal(sub.images[0], data.images[7])
    assert sub.mean == data.mean and sub.num_classes == 3
    mask = np.zeros(10, dtype=bool)
    mask[[1, 4]] = True
    assert data.subset(mask).labels.tolist() == [1, 1]
    assert torch.equal(data.subset(torch.tensor([4, 1])).images, data.images[[4, 1]])
    with pytest.raises(ValueError, match="uint8"):
        ImageData(data.images.float(), data.labels, data.mean, data.std, 3)
    with pytest.raises(ValueError, match="per channel"):
        ImageData(data.images, data.labels, (0.5,), (0.2,), 3)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Train single-threaded: two threads on a busy 2-core CI runner can be 20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("one_torch_thread")
def test_synthetic_is_deterministic_and_learnable() -> None:
    from lowprec_fl.models import SmallCNN

    train = load_image_data("synthetic", None, train=True)
    test = load_image_data("synthetic", None, train=False)
    assert (len(train), len(test)) == (2000, 500)
    assert train.images.shape[1:] == (1, 28, 28) and train.num_classes == 10
    assert torch.bincount(train.labels).tolist() == [200] * 10
    assert load_image_data("synthetic", "/ignored", train=True, pad_to=32).image_size == 32

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, image_size=28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _, (x, y) in zip(range(15), batches, strict=False):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = next(test.batches(500, shuffle=False))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5


# --- partitioning ------------------------------------------------------------------------


def _assert_disjoint(parts: list[np.ndarray], n: int) -> np.ndarray:
    flat = np.concatenate(parts)
    assert np.unique(flat).shape[0] == flat.shape[0], "an index is used twice"
    assert flat.min() >= 0 and flat.max() < n
    return flat


def _classes_over_5pct(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    hist = label_histogram(labels, parts, 10)
    return (hist / hist.sum(axis=1, keepdims=True) > 0.05).sum(axis=1)


@pytest.mark.parametrize("alpha", [0.01, 0.16])
def test_balanced_dirichlet_on_mnist(mnist_labels: np.ndarray, alpha: float) -> None:
    n = mnist_labels.shape[0]
    parts = partition_indices(mnist_labels, "balanced_dirichlet", 80, alpha=alpha, seed=3)
    sizes = np.array([p.shape[0] for p in parts])
    assert len(parts) == 80 and sizes.max() - sizes.min() <= 1
    flat = _assert_disjoint(parts, n)
    assert flat.shape[0] in (n, n - n % 80)


def test_balanced_dirichlet_skew_decreases_with_alpha(mnist_labels: np.ndarray) -> None:
    strong = partition_indices(mnist_labels, "balanced_dirichlet", 80, alpha=0.01, seed=3)
    mild = partition_indices(mnist_labels, "balanced_dirichlet", 80, alpha=0.16, seed=3)
    strong_classes = _classes_over_5pct(mnist_labels, strong)
    mild_classes = _classes_over_5pct(mnist_labels, mild)
    assert np.median(strong_classes) <= 2
    assert mild_classes.mean() > strong_classes.mean() + 0.5
    iid = partition_indices(mnist_labels, "iid", 80, seed=3)
    assert _classes_over_5pct(mnist_labels, iid).min() >= 9


def test_balanced_dirichlet_uses_remainder_and_non_integer_labels() -> None:
    labels = np.array(["cat", "dog", "emu"] * 34 + ["cat"])  # 103 samples
    parts = partition_indices(labels, "balanced_dirichlet", 10, alpha=0.05, seed=0)
    assert sorted(p.shape[0] for p in parts) == [10] * 7 + [11] * 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_flwr_schemes_are_disjoint(mnist_labels: np.ndarray, scheme: str) -> None:
    parts = partition_indices(
        mnist_labels, scheme, 20, alpha=0.5, classes_per_partition=2, seed=1, min_partition_size=10
    )
    assert len(parts) == 20
    _assert_disjoint(parts, mnist_labels.shape[0])
    assert min(p.shape[0] for p in parts) >= 10
    if scheme == "iid":
        assert {p.shape[0] for p in parts} == {3000}
        assert _classes_over_5pct(mnist_labels, parts).min() >= 9
    if scheme == "pathological":
        hist = label_histogram(mnist_labels, parts, 10)
        assert ((hist > 0).sum(axis=1) == 2).all()


def test_pathological_random_mode(mnist_labels: np.ndarray) -> None:
    kwargs = {"classes_per_partition": 3, "class_assignment_mode": "random"}
    parts = partition_indices(mnist_labels, "pathological", 10, seed=2, **kwargs)
    assert ((label_histogram(mnist_labels, parts, 10) > 0).sum(axis=1) == 3).all()
    _assert_disjoint(parts, mnist_labels.shape[0])


def test_fast_path_matches_public_load_partition(mnist_labels: np.ndarray) -> None:
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = mnist_labels[:12000]
    parts = partition_indices(labels, "dirichlet", 5, alpha=0.3, seed=4)
    reference = DirichletPartitioner(
        5, "label", 0.3, min_partition_size=0, self_balancing=True, seed=4
    )
    reference.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(12000)})
    for i in (0, 4):
        assert np.array_equal(parts[i], np.asarray(reference.load_partition(i)["idx"]))


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "balanced_dirichlet"])
def test_seeding(mnist_labels: np.ndarray, scheme: str) -> None:
    labels = mnist_labels[:6000]
    a = partition_indices(labels, scheme, 10, alpha=0.3, seed=5, class_assignment_mode="random")
    b = partition_indices(
        labels.copy(), scheme, 10, alpha=0.3, seed=5, class_assignment_mode="random"
    )
    c = partition_indices(labels, scheme, 10, alpha=0.3, seed=6, class_assignment_mode="random")
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_cached_result_is_read_only() -> None:
    labels = np.arange(100) % 10
    parts = partition_indices(labels, "iid", 4, seed=0)
    assert partition_indices(labels, "iid", 4, seed=0)[0] is parts[0]
    with pytest.raises(ValueError, match="read-only"):
        parts[0][0] = 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "shards"}, "Unknown partition scheme"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "balanced_dirichlet", "alpha": -1.0}, "alpha"),
        ({"scheme": "iid", "num_partitions": 0}, "num_partitions"),
        ({"scheme": "iid", "num_partitions": 101}, "num_partitions"),
        ({"scheme": "pathological", "classes_per_partition": 0}, "classes_per_partition"),
        ({"scheme": "pathological", "classes_per_partition": 11}, "classes_per_partition"),
        ({"scheme": "pathological", "class_assignment_mode": "x"}, "class_assignment_mode"),
        ({"scheme": "iid", "min_partition_size": -1}, "min_partition_size"),
    ],
)
def test_partition_argument_errors(kwargs: dict, match: str) -> None:
    args = {"num_partitions": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        partition_indices(np.arange(100) % 10, **args)


def test_flwr_dirichlet_failure_points_to_balanced(mnist_labels: np.ndarray) -> None:
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="balanced_dirichlet"):
        partition_indices(mnist_labels, "dirichlet", 80, alpha=0.01, min_partition_size=10)


def test_balanced_partitioner_behaves_like_flwr_partitioners(mnist_labels: np.ndarray) -> None:
    partitioner = BalancedDirichletPartitioner(num_partitions=80, alpha=0.01, seed=7)
    partitioner.dataset = datasets.Dataset.from_dict({"label": mnist_labels})
    assert partitioner.num_partitions == 80
    part = partitioner.load_partition(3)
    assert len(part) == 750
    expected = partition_indices(mnist_labels, "balanced_dirichlet", 80, alpha=0.01, seed=7)[3]
    assert np.array_equal(np.asarray(part["label"]), mnist_labels[expected])
    with pytest.raises(ValueError, match="partition_id"):
        partitioner.load_partition(80)
    with pytest.raises(ValueError, match="alpha"):
        BalancedDirichletPartitioner(num_partitions=4, alpha=0)


def test_train_test_split_indices() -> None:
    indices = np.arange(100, 150)
    train, test = train_test_split_indices(indices, 0.2, seed=0)
    assert (train.shape[0], test.shape[0]) == (40, 10)
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)
    again = train_test_split_indices(indices, 0.2, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(train, train_test_split_indices(indices, 0.2, seed=1)[0])
    train, test = train_test_split_indices(indices, 0.0, seed=0)
    assert train.shape[0] == 50 and test.shape[0] == 0
    train, test = train_test_split_indices(np.array([5]), 0.5, seed=0)
    assert train.tolist() == [5] and test.shape[0] == 0
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split_indices(indices, 1.0, seed=0)


def test_label_histogram() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
