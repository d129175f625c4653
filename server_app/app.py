"""The ServerApp: compose the config, run the low-precision strategy, record and save results."""

from __future__ import annotations

import random
import time
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from lowprec_fl.task.config import load_config, resolve_device
from lowprec_fl.task.data import ExampleBounds, central_test_data, max_client_examples
from lowprec_fl.task.model import build_configured_model, float_buffer_names
from lowprec_fl.task.training import evaluate_model
from lowprec_fl.wire import TensorSpec, specs_of
from strategies import LowPrecisionStrategy, RoundMetrics
from strategies.factory import build_strategy
from strategies.quantized_messages import width_metric

from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_fits,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from .results import ResultsWriter, RoundRow, format_row

app = ServerApp()


def output_directory(cfg: DictConfig) -> Path:
    """``output_dir`` from the config, else a fresh timestamped folder under ~/lowprec-fl."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path.home() / "lowprec-fl" / "outputs" / stamp


class RoundRecorder:
    """Server-side evaluation of the broadcast model each round, plus traffic bookkeeping."""

    def __init__(
        self,
        cfg: DictConfig,
        model: torch.nn.Module,
        strategy: LowPrecisionStrategy,
        writer: ResultsWriter,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.strategy = strategy
        self.writer = writer
        self.device = resolve_device(cfg)
        self.test_data = central_test_data(cfg)
        self.last_time = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate ``arrays`` (the moving average) centrally, record the round, checkpoint it.

        ``server_round`` is the run's absolute round (``ResumableRun`` passes it so); the
        round's bytes, rejections and client metrics are what the strategy returned.
        """
        state = {name: arrays[name].numpy() for name in arrays}
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        loss, accuracy = evaluate_model(
            self.model.to(self.device), self.test_data, self.cfg.server.eval_batch_size, self.device
        )
        if any(row.round == server_round for row in self.writer.rows):
            return MetricRecord({"accuracy": accuracy, "loss": loss})  # resumed: already recorded
        now = time.perf_counter()
        returned = self.strategy.history.get(server_round, RoundMetrics())
        train = dict(returned.train.items()) if returned.train is not None else {}
        evaluate = dict(returned.evaluate.items()) if returned.evaluate is not None else {}

        def both(key: str) -> int:
            return int(train.get(key, 0)) + int(evaluate.get(key, 0))

        row = RoundRow(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            uplink_bytes=both("uplink-bytes"),
            downlink_bytes=both("downlink-bytes"),
            fp32_uplink_bytes=both("fp32-uplink-bytes"),
            fp32_downlink_bytes=both("fp32-downlink-bytes"),
            seconds=now - self.last_time,
            rejected_updates=both("rejected-replies"),
            failed_clients=int(train.get("failed-replies", 0)),
            clipped_updates=int(train.get("clipped-updates", 0)),
            max_update_norm_ratio=float(train.get("max-update-norm-ratio", 0.0)),
            train_loss=_number(train.get("train-loss")),
            eval_loss=_number(evaluate.get("eval-loss")),
            eval_accuracy=_number(evaluate.get("eval-accuracy")),
            bytes_by_bits=_bytes_by_bits(train, evaluate),
        )
        self.last_time = now
        self.writer.add(row)  # first the row, then the checkpoint: a resume never skips a row
        save_checkpoint(self.writer.output_dir, server_round, state, self.strategy)
        log(INFO, "%s", format_row(row, int(self.cfg.federation.num_rounds)))
        return MetricRecord({"accuracy": accuracy, "loss": loss})


def _example_bounds(cfg: DictConfig, connected: int) -> ExampleBounds:
    """The weight caps for clients that partition the data like the config or the federation.

    A client splits the data into its ``num-partitions``: ``federation.num_clients`` by
    default, the number of SuperNodes in simulation. The largest partition does not shrink
    steadily with the count, so the cap is the larger of the two counts' bounds.
    """
    counts = {int(cfg.federation.num_clients), connected} - {0}
    bounds = [max_client_examples(cfg, n) for n in sorted(counts)]
    return ExampleBounds(
        train=max(b.train for b in bounds), evaluate=max(b.evaluate for b in bounds)
    )


def _bytes_by_bits(*phases: dict) -> dict[str, int]:
    """Bytes per direction and width over the round's phases, e.g. ``{"uplink-4bit": n}``."""
    totals: dict[str, int] = {}
    for metrics in phases:
        for key, value in metrics.items():
            width = width_metric(key)
            if width is not None:
                name = f"{width[0]}-{width[1]}bit"
                totals[name] = totals.get(name, 0) + int(value)
    return dict(sorted(totals.items()))


def _number(value: object) -> float | None:
    """A scalar metric as a float; None when absent (or a list)."""
    return float(value) if isinstance(value, int | float) else None


def _resume(
    out: Path,
    strategy: LowPrecisionStrategy,
    writer: ResultsWriter,
    template: dict[str, TensorSpec],
    num_rounds: int,
) -> ArrayRecord:
    """Restore the server state saved after the last finished round; returns its model.

    Refuses (``CheckpointError``, naming the file) a checkpoint that is damaged, belongs to
    another model or strategy, or is past this run's rounds.
    """
    path = out / CHECKPOINT_NAME
    checkpoint = load_checkpoint(out)
    if checkpoint is None:
        raise FileNotFoundError(
            f"server.resume=true but {path} does not exist: set output_dir to "
            "the folder of the run to continue, or drop server.resume"
        )
    check_fits(checkpoint, template, path)
    if checkpoint.round >= num_rounds:
        raise CheckpointError(
            f"{path} was written after round {checkpoint.round}, and this run has "
            f"federation.num_rounds={num_rounds}: nothing is left to do (raise num_rounds to "
            "train further)"
        )
    names = list(template)
    try:
        restore(checkpoint, strategy, names)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from None
    writer.load_rows(up_to=checkpoint.round)
    log(INFO, "Resuming after round %d from %s", checkpoint.round, path)
    return ArrayRecord({name: Array(checkpoint.model[name]) for name in names})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured low-precision federated training and save everything it produced."""
    cfg = load_config(context.run_config)
    random.seed(int(cfg.seed))  # for other users of random; sampling is seeded per round
    out = output_directory(cfg)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    writer = ResultsWriter(out, config_dict)
    log(INFO, "Low-precision FL: results go to %s", out)
    model = build_configured_model(cfg)
    template = {name: t.detach().clone() for name, t in model.state_dict().items()}
    connected = len(list(grid.get_node_ids()))
    bounds = None if cfg.server.max_num_examples else _example_bounds(cfg, connected)
    strategy = build_strategy(cfg, specs_of(template), float_buffer_names(model), bounds)
    initial = ArrayRecord({name: Array(t.numpy()) for name, t in template.items()})
    if cfg.server.resume:
        initial = _resume(out, strategy, writer, specs_of(template), int(cfg.federation.num_rounds))
    if connected and connected != cfg.federation.num_clients:
        log(
            WARNING,
            "federation.num_clients=%d but %d SuperNodes are connected now; in simulation run "
            "with --federation-config 'num-supernodes=%d'",
            cfg.federation.num_clients,
            connected,
            cfg.federation.num_clients,
        )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(cfg.federation.num_rounds),  # the total: a resumed run continues
        timeout=float(cfg.federation.round_timeout),
        # Clients read their training settings from the same run config; the strategy adds the
        # round, the lineage and (FedProx) mu to this record.
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=RoundRecorder(cfg, model, strategy, writer),
    )
    # No round aggregated anything (every client failed): the model is still the initial one.
    arrays = result.arrays if len(result.arrays) else initial
    final = {name: torch.from_numpy(arrays[name].numpy()) for name in arrays}
    save_file(final, str(out / "model.safetensors"))
    for path in writer.plot():
        log(INFO, "Saved %s", path)
    log(INFO, "Saved results.json, results.csv and model.safetensors in %s", out)
