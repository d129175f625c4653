"""The data each party sees: a client's partition (train + held-out) and the central test set."""

from __future__ import annotations

from omegaconf import DictConfig

from federated_data import (
    ImageData,
    load_image_data,
    partition_indices,
    train_test_split_indices,
)


def _load(cfg: DictConfig, train: bool) -> ImageData:
    ds = cfg.dataset
    return load_image_data(ds.name, ds.root or None, train=train, pad_to=ds.pad_to)


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
    part = cfg.partition
    parts = partition_indices(
        data.labels.numpy(),
        part.scheme,
        num_partitions,
        alpha=part.alpha,
        classes_per_partition=part.classes_per_client,
        seed=cfg.seed,
    )
    train_idx, test_idx = train_test_split_indices(
        parts[partition_id], part.test_fraction, seed=cfg.seed + partition_id
    )
    return data.subset(train_idx), data.subset(test_idx)


def central_test_data(cfg: DictConfig) -> ImageData:
    """The server's test set (optionally capped at ``server.max_eval_samples``)."""
    data = _load(cfg, train=False)
    cap = cfg.server.max_eval_samples
    return data.subset(range(cap)) if 0 < cap < len(data) else data


def data_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(channels, image size, classes) of the configured dataset."""
    data = central_test_data(cfg)
    return data.num_channels, data.image_size, data.num_classes
