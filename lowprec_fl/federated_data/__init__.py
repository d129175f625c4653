"""Datasets as uint8 tensors and their federated partitioning."""

from lowprec_fl.federated_data.images import ImageData
from lowprec_fl.federated_data.loading import (
    DATASET_NAMES,
    DatasetUnavailableError,
    load_image_data,
    resolve_data_root,
)
from lowprec_fl.federated_data.partitioning import (
    PARTITION_SCHEMES,
    BalancedDirichletPartitioner,
    balanced_dirichlet_split,
    label_histogram,
    partition_indices,
    train_test_split_indices,
)

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "BalancedDirichletPartitioner",
    "DatasetUnavailableError",
    "ImageData",
    "balanced_dirichlet_split",
    "label_histogram",
    "load_image_data",
    "partition_indices",
    "resolve_data_root",
    "train_test_split_indices",
]
