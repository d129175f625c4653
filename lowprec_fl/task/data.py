"""The data each party sees: a client's partition (train + held-out) and the central test set."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from omegaconf import DictConfig

from lowprec_fl.federated_data import (
    ImageData,
    load_image_data,
    partition_indices,
    train_test_split_indices,
)
from lowprec_fl.federated_data.local_folder import load_local_folder


def _load(cfg: DictConfig, train: bool) -> ImageData:
    ds = cfg.dataset
    return load_image_data(ds.name, ds.root or None, train=train, pad_to=ds.pad_to)


def _partitions(cfg: DictConfig, num_partitions: int, labels) -> list:
    part = cfg.partition
    return partition_indices(
        labels,
        part.scheme,
        num_partitions,
        alpha=part.alpha,
        classes_per_partition=part.classes_per_client,
        seed=cfg.seed,
    )


def client_data(
    cfg: DictConfig, partition_id: int, num_partitions: int
) -> tuple[ImageData, ImageData]:
    """(local train split, local held-out split) of one client's partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1}: start each "
            "SuperNode with --node-config 'partition-id=<i> num-partitions=<N>'"
        )
    data = _load(cfg, train=True)
    parts = _partitions(cfg, num_partitions, data.labels.numpy())
    train_idx, test_idx = train_test_split_indices(
        parts[partition_id], cfg.partition.test_fraction, seed=cfg.seed + partition_id
    )
    return data.subset(train_idx), data.subset(test_idx)


def node_data(cfg: DictConfig, data_dir: str | os.PathLike[str]) -> tuple[ImageData, ImageData]:
    """(local train split, local held-out split) of a device's own images in ``data_dir``.

    All of it, no partitioning; ``partition.test_fraction`` of it is held out (seeded by
    ``seed``). See ``lowprec_fl.federated_data.local_folder`` for the folder layouts.
    """
    data = load_local_folder(cfg.dataset.name, data_dir, cfg.dataset.pad_to)
    train_idx, test_idx = train_test_split_indices(
        np.arange(len(data)), cfg.partition.test_fraction, seed=cfg.seed
    )
    return data.subset(train_idx), data.subset(test_idx)


class ExampleBounds(NamedTuple):
    """The most examples an honest client reports (``num-examples``) in one round."""

    train: int
    evaluate: int


def max_client_examples(cfg: DictConfig, num_partitions: int) -> ExampleBounds:
    """Bounds on honest ``num-examples`` claims: the server's default weight caps.

    Training: ``local_epochs`` times the largest training split of ``num_partitions``
    partitions, at most ``max_steps * batch_size`` when steps are capped. Evaluation: the
    largest held-out split.
    """
    data = _load(cfg, train=True)
    parts = _partitions(cfg, num_partitions, data.labels.numpy())
    fraction = cfg.partition.test_fraction
    splits = [train_test_split_indices(p, fraction, seed=cfg.seed + i) for i, p in enumerate(parts)]
    t = cfg.train
    train = int(t.local_epochs) * max(len(train) for train, _ in splits)
    if int(t.max_steps) > 0:
        train = min(train, int(t.max_steps) * int(t.batch_size))
    return ExampleBounds(train=train, evaluate=max(len(test) for _, test in splits))


def central_test_data(cfg: DictConfig) -> ImageData:
    """The server's test set (optionally capped at ``server.max_eval_samples``)."""
    data = _load(cfg, train=False)
    cap = cfg.server.max_eval_samples
    return data.subset(range(cap)) if 0 < cap < len(data) else data


def data_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(channels, image size, classes) of the configured dataset."""
    data = central_test_data(cfg)
    return data.num_channels, data.image_size, data.num_classes
