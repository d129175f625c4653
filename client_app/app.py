"""The ClientApp: receive Q(w_bar), train locally in low precision, upload the quantized model."""

from __future__ import annotations

import functools
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from omegaconf import DictConfig

from lowprec_fl.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LINEAGE_KEY,
    MESSAGE_SLACK_BYTES,
    METRICS_KEY,
    PROXIMAL_MU_KEY,
    ROUND_KEY,
    WEIGHT_KEY,
)
from lowprec_fl.task.allocator import retain_freed_memory
from lowprec_fl.task.config import load_config, resolve_device
from lowprec_fl.task.formats import (
    client_bits,
    client_downlinks,
    client_quantization,
    training_precision,
    uplink_format,
)
from lowprec_fl.task.model import build_configured_model
from lowprec_fl.task.training import evaluate_model, make_optimizer, train_local
from lowprec_fl.wire import payload_limit, specs_of

from .mod import MAX_ROUND, LowPrecisionMod, config_value, round_generator
from .site import client_site
from .state import (
    load_optimizer_state,
    read_round_state,
    save_optimizer_state,
    state_directory,
    write_round_state,
)


def _quantization(cfg: DictConfig, context: Context) -> DictConfig:
    """The quantization settings of this client: the run's, at the client's own width."""
    party = client_site(cfg, context).party
    return client_quantization(cfg, client_bits(cfg, context.node_config, party))


def low_precision_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``LowPrecisionMod`` with the formats the run config names for this node.

    A Flower mod is fixed when the ClientApp is built, and this app's formats come from the
    run config, so the mod is made per message (cheap: it holds three values).
    """
    cfg = load_config(context.run_config)
    bits = client_bits(cfg, context.node_config, client_site(cfg, context).party)
    mod = LowPrecisionMod(
        uplink=uplink_format(client_quantization(cfg, bits)),
        downlink=client_downlinks(cfg, bits),
        seed=int(cfg.seed),
        max_bytes=_broadcast_limit(tuple(sorted(context.run_config.items()))),
    )
    return mod(msg, context, call_next)


@functools.lru_cache(maxsize=8)
def _broadcast_limit(run_config: tuple) -> int:
    """The largest broadcast this client accepts: its model in float32, plus a margin."""
    model = build_configured_model(load_config(dict(run_config)))
    return payload_limit(specs_of(model.state_dict())) + MESSAGE_SLACK_BYTES


app = ClientApp(mods=[low_precision_mod])


def _load_model(msg: Message, model: torch.nn.Module) -> None:
    """Load the broadcast (float32 once ``low_precision_mod`` decoded it) into ``model``."""
    arrays = msg.content.array_records[ARRAYS_KEY]
    model.load_state_dict({name: torch.from_numpy(a.numpy()) for name, a in arrays.items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local low-precision training on this client's data."""
    started = time.perf_counter()
    cfg = load_config(context.run_config)
    torch.set_num_threads(int(cfg.train.threads))
    if cfg.train.retain_freed_memory:
        retain_freed_memory()
    site = client_site(cfg, context)
    config = msg.content.config_records.get(CONFIG_KEY, {})
    server_round = config_value(config, ROUND_KEY, 0, int, 0, MAX_ROUND)
    device = resolve_device(cfg)
    train_data, _ = site.data(cfg)
    model = build_configured_model(cfg)
    _load_model(msg, model)
    model.to(device)
    precision = training_precision(_quantization(cfg, context))
    generator = round_generator(cfg.seed, site.party, server_round)
    t = cfg.train
    optimizer = make_optimizer(
        model, t.optimizer, float(t.lr), precision, generator, t.momentum, t.weight_decay
    )
    lineage = config_value(config, LINEAGE_KEY, "", str)
    state_dir = state_directory(cfg, context.node_config, site.name, lineage)
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
        arithmetic=str(t.arithmetic),
    )
    state_bytes = 0
    if t.keep_optimizer_state:
        state_bytes = save_optimizer_state(context.state, optimizer)
        if state_dir:
            write_round_state(state_dir, server_round, context.state)
    arrays = ArrayRecord(
        {
            k: Array(np.asarray(v.detach().cpu().numpy(), order="C"))
            for k, v in model.state_dict().items()
        }
    )
    metrics = MetricRecord(
        {
            WEIGHT_KEY: result.num_examples,
            "train-loss": result.loss,
            "train-steps": result.steps,
            "optimizer-state-bytes": state_bytes,
            "train-seconds": time.perf_counter() - started,
        }
    )
    # low_precision_mod encodes the arrays at this client's uplink format
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's local held-out split."""
    cfg = load_config(context.run_config)
    torch.set_num_threads(int(cfg.train.threads))
    _, test_data = client_site(cfg, context).data(cfg)
    device = resolve_device(cfg)
    model = build_configured_model(cfg)
    _load_model(msg, model)
    loss, accuracy = evaluate_model(model.to(device), test_data, cfg.server.eval_batch_size, device)
    metrics = MetricRecord(
        {WEIGHT_KEY: len(test_data), "eval-loss": loss, "eval-accuracy": accuracy}
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


__all__ = ["app"]
