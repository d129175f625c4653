"""The ClientApp: receive Q(w_bar), train locally in low precision, upload the quantized model."""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from lowprec_fl.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FORMAT_SUFFIX,
    LINEAGE_KEY,
    MESSAGE_SLACK_BYTES,
    METRICS_KEY,
    PARTITION_KEY,
    PROXIMAL_MU_KEY,
    ROUND_KEY,
    WEIGHT_KEY,
    model_records,
)
from lowprec_fl.wire import (
    WireFormatError,
    decode_tensors,
    encode_tensors,
    payload_limit,
    serialized_size,
    specs_of,
)
from task.allocator import retain_freed_memory
from task.config import load_config, resolve_device
from task.data import client_data
from task.formats import downlink_format, training_precision, uplink_format
from task.model import build_configured_model, float_buffer_names
from task.training import evaluate_model, make_optimizer, train_local

from .mod import MAX_ROUND, config_value, round_generator
from .state import (
    load_optimizer_state,
    read_round_state,
    save_optimizer_state,
    state_directory,
    write_round_state,
)

app = ClientApp()


def _partition(cfg: DictConfig, context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) from the SuperNode's ``--node-config``."""
    node = context.node_config
    if PARTITION_KEY not in node:
        raise ValueError(
            "this SuperNode has no partition: start it with "
            "--node-config 'partition-id=<i> num-partitions=<N>'"
        )
    return int(node[PARTITION_KEY]), int(node.get("num-partitions", cfg.federation.num_clients))


def _receive_model(msg: Message, cfg: DictConfig, model: torch.nn.Module) -> None:
    """Decode and validate the broadcast model, then load it.

    The broadcast must be in the downlink format the config names (width and blocks) and no
    larger than the model in float32 plus a small margin, so a server cannot make the client
    allocate more than its own model takes.
    """
    content = msg.content
    expected = specs_of(model.state_dict())
    payload = payload_limit(expected)
    size = serialized_size(content)
    if size > payload + MESSAGE_SLACK_BYTES:
        raise WireFormatError(
            f"the broadcast is {size} bytes, more than the limit of {payload + MESSAGE_SLACK_BYTES}"
        )
    arrays, formats = model_records(content)
    decoded = decode_tensors(
        arrays,
        formats,
        expected=expected,
        max_bytes=payload,
        fmt=downlink_format(cfg.quantization),
        allow_float=float_buffer_names(model),
    )
    model.load_state_dict(decoded)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local low-precision training on this client's partition."""
    started = time.perf_counter()
    cfg = load_config(context.run_config)
    torch.set_num_threads(int(cfg.train.threads))
    if cfg.train.retain_freed_memory:
        retain_freed_memory()
    partition_id, num_partitions = _partition(cfg, context)
    config = msg.content.config_records.get(CONFIG_KEY, {})
    server_round = config_value(config, ROUND_KEY, 0, int, 0, MAX_ROUND)
    device = resolve_device(cfg)
    train_data, _ = client_data(cfg, partition_id, num_partitions)
    model = build_configured_model(cfg)
    _receive_model(msg, cfg, model)
    model.to(device)
    precision = training_precision(cfg.quantization)
    generator = round_generator(cfg.seed, partition_id, server_round)
    t = cfg.train
    optimizer = make_optimizer(
        model, t.optimizer, float(t.lr), precision, generator, t.momentum, t.weight_decay
    )
    lineage = config_value(config, LINEAGE_KEY, "", str)
    state_dir = state_directory(cfg, context.node_config, partition_id, lineage)
    if t.keep_optimizer_state:
        saved = read_round_state(state_dir, server_round) if state_dir else None
        if saved is None:
            load_optimizer_state(context.state, optimizer)
        else:
            load_optimizer_state(saved, optimizer, source=f"the state file in {state_dir}")
    result = train_local(
        model,
        optimizer,
        train_data,
        precision,
        epochs=int(t.local_epochs),
        batch_size=int(t.batch_size),
        generator=generator,
        device=device,
        proximal_mu=float(config_value(config, PROXIMAL_MU_KEY, 0.0, float, 0.0, 1e6)),
        max_steps=int(t.max_steps),
    )
    state_bytes = 0
    if t.keep_optimizer_state:
        state_bytes = save_optimizer_state(context.state, optimizer)
        if state_dir:
            write_round_state(state_dir, server_round, context.state)
    q = cfg.quantization
    arrays, formats = encode_tensors(
        {k: v.cpu() for k, v in model.state_dict().items()},
        uplink_format(q),
        generator,
        keep_float=() if q.quantize_buffers else float_buffer_names(model),
    )
    metrics = MetricRecord(
        {
            WEIGHT_KEY: result.num_examples,
            "train-loss": result.loss,
            "train-steps": result.steps,
            "payload-bytes": arrays.count_bytes(),
            "optimizer-state-bytes": state_bytes,
            "train-seconds": time.perf_counter() - started,
        }
    )
    content = RecordDict(
        {ARRAYS_KEY: arrays, ARRAYS_KEY + FORMAT_SUFFIX: formats, METRICS_KEY: metrics}
    )
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (it orders nodes by it to sample reproducibly)."""
    cfg = load_config(context.run_config)
    partition_id, _ = _partition(cfg, context)
    metrics = MetricRecord({PARTITION_KEY: partition_id})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's local held-out split."""
    cfg = load_config(context.run_config)
    torch.set_num_threads(int(cfg.train.threads))
    partition_id, num_partitions = _partition(cfg, context)
    _, test_data = client_data(cfg, partition_id, num_partitions)
    device = resolve_device(cfg)
    model = build_configured_model(cfg)
    _receive_model(msg, cfg, model)
    loss, accuracy = evaluate_model(model.to(device), test_data, cfg.server.eval_batch_size, device)
    metrics = MetricRecord(
        {WEIGHT_KEY: len(test_data), "eval-loss": loss, "eval-accuracy": accuracy}
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


__all__ = ["app"]
