"""The message protocol between the ServerApp and the ClientApp: one home for every key.

Broadcast (server -> client), a train or evaluate message:

* ``ARRAYS_KEY``: an ``ArrayRecord`` holding the model as quantized tensors (see ``wire``);
* ``ARRAYS_KEY + FORMAT_SUFFIX``: the ``ConfigRecord`` describing each tensor's format;
* ``CONFIG_KEY``: a ``ConfigRecord`` with ``ROUND_KEY``, ``LINEAGE_KEY`` (train) and the inner
  strategy's own keys (e.g. ``PROXIMAL_MU_KEY`` for FedProx).

Reply (client -> server): the same two array records for training, at the client's own
width (any the server accepts), and ``METRICS_KEY``, a ``MetricRecord`` whose ``WEIGHT_KEY``
is the number of examples the client used (``PAYLOAD_BYTES_KEY``: the encoded arrays' size).

Node config (a SuperNode's ``--node-config``): ``DATA_DIR_KEY``, the folder of the device's own
images (used whole), or in simulation ``PARTITION_KEY`` and ``NUM_PARTITIONS_KEY``, its share
of a dataset; ``NODE_BITS_KEY`` its mantissa width when it differs from the run's. The server
sends nothing else: it samples clients without asking nodes anything
(``strategies.ReproducibleSampling``), and learns a client's width from its replies.
"""

from __future__ import annotations

import re

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from lowprec_fl.wire import EXPONENT_SUFFIX, FORMAT_SUFFIX, MESSAGE_SLACK_BYTES, WireFormatError

#: The ArrayRecord of the model (Flower's strategies default to the same name).
ARRAYS_KEY = "arrays"
#: The ConfigRecord of the server's settings for a round (Flower's default name).
CONFIG_KEY = "config"
#: The MetricRecord of a reply.
METRICS_KEY = "metrics"
#: The config key of the server round (Flower's strategies set it).
ROUND_KEY = "server-round"
#: The config key of FedProx's proximal term (Flower's FedProx sets it).
PROXIMAL_MU_KEY = "proximal-mu"
#: The train-config key naming the run lineage (a run and its resumptions): 32 hex digits.
LINEAGE_KEY = "lineage"
#: What a lineage looks like: the server draws it as ``uuid.uuid4().hex``.
LINEAGE_PATTERN = re.compile(r"[0-9a-f]{32}")
#: The metric weighting a reply (Flower's ``weighted_by_key`` default).
WEIGHT_KEY = "num-examples"
#: The node-config keys of a node's data partition (simulation, rehearsals).
PARTITION_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
#: The node-config key of the folder with a device's own images (deployment).
DATA_DIR_KEY = "data-dir"
#: The node-config key of a node's mantissa width (clients at different precisions).
NODE_BITS_KEY = "precision-bits"
#: The reply metric with the size of the encoded arrays, in bytes.
PAYLOAD_BYTES_KEY = "payload-bytes"


def model_records(content: RecordDict) -> tuple[ArrayRecord, ConfigRecord]:
    """A broadcast's model: its ``ARRAYS_KEY`` ArrayRecord and that record's format record."""
    arrays = content.array_records.get(ARRAYS_KEY)
    formats = content.config_records.get(ARRAYS_KEY + FORMAT_SUFFIX)
    if arrays is None or formats is None:
        raise WireFormatError(
            f"the broadcast lacks the ArrayRecord {ARRAYS_KEY!r} or its ConfigRecord "
            f"{ARRAYS_KEY + FORMAT_SUFFIX!r}: is the server strategy wrapped in QuantizedMessages?"
        )
    return arrays, formats


__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "DATA_DIR_KEY",
    "EXPONENT_SUFFIX",
    "FORMAT_SUFFIX",
    "LINEAGE_KEY",
    "LINEAGE_PATTERN",
    "MESSAGE_SLACK_BYTES",
    "METRICS_KEY",
    "NODE_BITS_KEY",
    "NUM_PARTITIONS_KEY",
    "PARTITION_KEY",
    "PAYLOAD_BYTES_KEY",
    "PROXIMAL_MU_KEY",
    "ROUND_KEY",
    "WEIGHT_KEY",
    "model_records",
]
