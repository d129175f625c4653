"""Split sample indices across federated clients (flwr-datasets partitioners plus our own)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "balanced_dirichlet")
CLASS_ASSIGNMENT_MODES: tuple[str, ...] = ("deterministic", "random")
_CACHE_SIZE = 32
_cache: OrderedDict[tuple, tuple[np.ndarray, ...]] = OrderedDict()


def balanced_dirichlet_split(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int = 0
) -> list[np.ndarray]:
    """Size-balanced Dirichlet label-skew split of `labels` into `num_partitions` index arrays.

    Each partition gets N // num_partitions samples (the first N % num_partitions get one more),
    with its class mix drawn from Dirichlet(alpha) over the classes; a class that runs out is
    dropped and the partition's remaining prior is renormalised over the classes left.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    _check_common(n, num_partitions, alpha)
    _, class_ids = np.unique(labels, return_inverse=True)
    remaining = np.bincount(class_ids).astype(np.int64)
    num_classes = remaining.shape[0]
    rng = np.random.default_rng(seed)

    priors = rng.dirichlet(np.full(num_classes, float(alpha)), size=num_partitions)
    counts = np.zeros((num_partitions, num_classes), dtype=np.int64)
    deficit = np.full(num_partitions, n // num_partitions, dtype=np.int64)
    deficit[: n % num_partitions] += 1

    # Each round: every unfilled partition draws its missing samples from its prior restricted
    # to the classes still available; an oversubscribed class is shared out at random among
    # the partitions that asked for it and is then exhausted. So at most num_classes + 1 rounds.
    while deficit.any():
        available = remaining > 0
        probs = priors * available
        mass = probs.sum(axis=1, keepdims=True)
        fallback = np.broadcast_to(remaining / remaining.sum(), probs.shape)
        probs = np.where(mass > 0, probs / np.where(mass > 0, mass, 1.0), fallback)
        demand = rng.multinomial(deficit, probs)
        for c in np.flatnonzero(demand.sum(axis=0) > remaining):
            demand[:, c] = rng.multivariate_hypergeometric(demand[:, c], remaining[c])
        counts += demand
        remaining -= demand.sum(axis=0)
        deficit -= demand.sum(axis=1)

    owner = np.full(n, -1, dtype=np.int64)
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(class_ids == c))
        takers = np.repeat(np.arange(num_partitions), counts[:, c])
        owner[members[: takers.shape[0]]] = takers
    return _group_by_owner(owner, num_partitions, rng)


def _group_by_owner(
    owner: np.ndarray, num_partitions: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices of each owner in random order (owner -1 = unassigned)."""
    shuffled = rng.permutation(owner.shape[0])
    shuffled = shuffled[owner[shuffled] >= 0]
    ordered = shuffled[np.argsort(owner[shuffled], kind="stable")]
    sizes = np.bincount(owner[ordered], minlength=num_partitions)
    return np.split(ordered, np.cumsum(sizes)[:-1])


class BalancedDirichletPartitioner(Partitioner):
    """flwr-datasets partitioner for the paper's size-balanced Dirichlet(alpha) label skew."""

    def __init__(
        self, num_partitions: int, alpha: float, partition_by: str = "label", seed: int = 42
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1; got {num_partitions}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0; got {alpha}")
        self._num_partitions = num_partitions
        self._alpha = float(alpha)
        self._partition_by = partition_by
        self._seed = seed
        self._partition_indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """Return the rows of `self.dataset` that belong to partition `partition_id`."""
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(
                f"partition_id must be in [0, {self._num_partitions}); got {partition_id}"
            )
        return self.dataset.select(self.all_partition_indices()[partition_id])

    def all_partition_indices(self) -> list[np.ndarray]:
        """Row indices of every partition (computed once, on first use)."""
        if self._partition_indices is None:
            labels = np.asarray(self.dataset[self._partition_by])
            self._partition_indices = balanced_dirichlet_split(
                labels, self._num_partitions, self._alpha, self._seed
            )
        return self._partition_indices


def partition_indices(
    labels: np.ndarray,
    scheme: str,
    num_partitions: int,
    *,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    min_partition_size: int = 0,
    class_assignment_mode: str = "deterministic",
) -> list[np.ndarray]:
    """Split sample indices 0..N-1 of `labels` into `num_partitions` arrays by `scheme`.

    Results are cached per process (keyed by a digest of `labels` and the arguments) and the
    returned arrays are read-only.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype == object:
        raise ValueError(
            f"labels must be a 1-D numeric or string array; got {labels.dtype} {labels.shape}"
        )
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"Unknown partition scheme {scheme!r}; valid: {PARTITION_SCHEMES}")
    _check_common(labels.shape[0], num_partitions, alpha)
    if classes_per_partition < 1:
        raise ValueError(f"classes_per_partition must be >= 1; got {classes_per_partition}")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0; got {min_partition_size}")
    if class_assignment_mode not in CLASS_ASSIGNMENT_MODES:
        raise ValueError(
            f"class_assignment_mode must be one of {CLASS_ASSIGNMENT_MODES}; "
            f"got {class_assignment_mode!r}"
        )
    digest = hashlib.blake2b(labels.tobytes(), digest_size=16).hexdigest()
    key = (
        digest,
        labels.dtype.str,
        labels.shape[0],
        scheme,
        num_partitions,
        float(alpha),
        classes_per_partition,
        seed,
        min_partition_size,
        class_assignment_mode,
    )
    if key in _cache:
        _cache.move_to_end(key)
        return list(_cache[key])
    parts = _compute(labels, *key[3:])
    for part in parts:
        part.flags.writeable = False
    _cache[key] = tuple(parts)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return list(parts)


def _check_common(n: int, num_partitions: int, alpha: float) -> None:
    if not 1 <= num_partitions <= n:
        raise ValueError(
            f"num_partitions must be between 1 and the number of samples ({n}); "
            f"got {num_partitions}"
        )
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")


def _compute(
    labels: np.ndarray,
    scheme: str,
    num_partitions: int,
    alpha: float,
    classes_per_partition: int,
    seed: int,
    min_partition_size: int,
    class_assignment_mode: str,
) -> list[np.ndarray]:
    n = labels.shape[0]
    if scheme == "balanced_dirichlet":
        if n // num_partitions < min_partition_size:
            raise ValueError(
                f"balanced_dirichlet gives {n // num_partitions} samples per partition, "
                f"fewer than min_partition_size={min_partition_size}"
            )
        return balanced_dirichlet_split(labels, num_partitions, alpha, seed)
    order = np.arange(n)
    if scheme == "iid":
        # IidPartitioner shards contiguously, so shuffle the rows first.
        order = np.random.default_rng(seed).permutation(n)
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=True,
            seed=seed,
        )
    else:
        if classes_per_partition > np.unique(labels).shape[0]:
            raise ValueError(
                f"classes_per_partition={classes_per_partition} exceeds the number of classes "
                f"({np.unique(labels).shape[0]})"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode=class_assignment_mode,  # type: ignore[arg-type]
            seed=seed,
        )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "idx": order})
    try:
        return _read_partitions(partitioner, order)
    except ValueError as exc:
        hint = " (for strong skew try scheme 'balanced_dirichlet')" if scheme == "dirichlet" else ""
        raise ValueError(f"{scheme} partitioning failed: {exc}{hint}") from exc


def _read_partitions(partitioner: Partitioner, order: np.ndarray) -> list[np.ndarray]:
    """Each partition's original sample indices (the `idx` column of its rows).

    `load_partition` spends ~0.1 s per call hashing the row list for the `datasets`
    fingerprint, so for partitioners that keep their row assignment in
    `_partition_id_to_indices` (flwr-datasets 0.6.1 Dirichlet/Pathological) we read it there,
    after the public `num_partitions` property has computed it; otherwise the public path.
    """
    num_partitions = partitioner.num_partitions  # also computes the assignment
    rows = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(rows, dict) and set(rows) == set(range(num_partitions)):
        return [order[np.asarray(rows[i], dtype=np.int64)] for i in range(num_partitions)]
    return [
        np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)
        for i in range(num_partitions)
    ]


def train_test_split_indices(
    indices: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle a client's `indices` deterministically and split off a local test set.

    The test part has round(len * test_fraction) samples, capped so that at least one training
    sample remains; it is empty when test_fraction is 0.
    """
    indices = np.asarray(indices)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    n = indices.shape[0]
    if n == 0:
        raise ValueError("cannot split an empty partition: it has no training sample")
    n_test = min(round(n * test_fraction), n - 1)
    shuffled = np.random.default_rng(seed).permutation(indices)
    return shuffled[n_test:], shuffled[:n_test]


def label_histogram(
    labels: np.ndarray, partitions: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """Per-partition class counts, shape (num_partitions, num_classes)."""
    labels = np.asarray(labels)
    rows = [
        np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes)[:num_classes]
        for p in partitions
    ]
    return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)
