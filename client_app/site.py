"""Which data a client trains on, and the id that keys its random streams and state folder.

A deployed SuperNode holds its own images: ``--node-config "data-dir='/data/images'"``, used
whole. In simulation (and the loopback rehearsals) a node takes its share of a dataset:
``--node-config "partition-id=3 num-partitions=10"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context
from omegaconf import DictConfig

from lowprec_fl.federated_data import ImageData
from lowprec_fl.protocol import DATA_DIR_KEY, NUM_PARTITIONS_KEY, PARTITION_KEY
from lowprec_fl.task.data import client_data, node_data


@dataclass(frozen=True)
class ClientSite:
    """A client's data source and identity.

    ``party`` seeds the client's data order, dither and upload rounding (with the run's seed
    and the round): the partition id, or for a device with its own data and no partition id,
    its SuperNode's node id. ``name`` is its state-file folder.
    """

    party: int
    name: str
    data_dir: str = ""
    partition: tuple[int, int] | None = None  # (partition id, number of partitions)

    def data(self, cfg: DictConfig) -> tuple[ImageData, ImageData]:
        """(local train split, local held-out split)."""
        if self.data_dir:
            return node_data(cfg, self.data_dir)
        assert self.partition is not None
        return client_data(cfg, *self.partition)


def client_site(cfg: DictConfig, context: Context) -> ClientSite:
    """The site a SuperNode's ``--node-config`` describes; ``ValueError`` names the keys."""
    node = context.node_config
    partition_id = int(node[PARTITION_KEY]) if PARTITION_KEY in node else None
    if DATA_DIR_KEY in node:
        data_dir = str(node[DATA_DIR_KEY])
        if not data_dir:
            raise ValueError(f"--node-config {DATA_DIR_KEY} is empty: give the images' folder")
        if partition_id is None:
            return ClientSite(int(context.node_id), f"node-{int(context.node_id)}", data_dir)
        return ClientSite(partition_id, f"partition-{partition_id}", data_dir)
    if partition_id is None:
        raise ValueError(
            "this SuperNode has no data: start it with --node-config "
            f"\"{DATA_DIR_KEY}='/path/to/its/images'\" (a deployed device's own data), or with "
            f"--node-config '{PARTITION_KEY}=<i> {NUM_PARTITIONS_KEY}=<N>' (a share of the "
            "configured dataset)"
        )
    partitions = int(node.get(NUM_PARTITIONS_KEY, cfg.federation.num_clients))
    return ClientSite(
        partition_id, f"partition-{partition_id}", partition=(partition_id, partitions)
    )
