"""Build the configured Flower strategy, wrapped for low-precision communication."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from lowprec_fl.task.data import ExampleBounds
from lowprec_fl.task.formats import accepted_bits, downlink_format, uplink_format
from lowprec_fl.wire import TensorSpec

from .low_precision import LowPrecisionStrategy
from .update_guard import UpdateGuard

#: Config names of the Flower strategies that plug in, and their classes.
INNER_STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": flwr_strategies.FedAvg,
    "fedprox": flwr_strategies.FedProx,
    "fedadam": flwr_strategies.FedAdam,
    "fedyogi": flwr_strategies.FedYogi,
    "fedadagrad": flwr_strategies.FedAdagrad,
    "fedavgm": flwr_strategies.FedAvgM,
    "fedmedian": flwr_strategies.FedMedian,
    "fedtrimmedavg": flwr_strategies.FedTrimmedAvg,
}


def build_inner_strategy(cfg: DictConfig) -> Strategy:
    """The Flower strategy ``cfg.strategy`` names, with the federation's sampling settings."""
    options = OmegaConf.to_container(cfg.strategy, resolve=True)
    name = options.pop("name")
    if name not in INNER_STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: use one of {sorted(INNER_STRATEGIES)}")
    fed = cfg.federation
    return INNER_STRATEGIES[name](
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_clients,
        min_evaluate_nodes=fed.min_evaluate_clients,
        min_available_nodes=fed.min_available_clients,
        **options,
    )


def build_update_guard(cfg: DictConfig, bounds: ExampleBounds | None) -> UpdateGuard:
    """The server's bounds on client updates; ``bounds``: the automatic weight caps, if known.

    ``server.max_num_examples`` > 0 sets both weight caps itself; 0 takes ``bounds``.
    """
    server = cfg.server
    cap = int(server.max_num_examples)
    train = cap or (bounds.train if bounds else 0)
    evaluate = cap or (bounds.evaluate if bounds else 0)  # 0: no held-out split, no evaluation
    return UpdateGuard(
        max_weight=float(train) or None,
        max_eval_weight=float(evaluate) or None,
        max_norm_ratio=float(server.max_update_norm_ratio),
        clip_factor=float(server.update_clip_factor),
    )


def build_strategy(
    cfg: DictConfig,
    template: Mapping[str, TensorSpec],
    float_buffers: Iterable[str],
    bounds: ExampleBounds | None = None,
) -> LowPrecisionStrategy:
    """The low-precision wrapper around the configured inner strategy.

    ``bounds`` are the most examples an honest client reports in a round (see
    ``lowprec_fl.task.data.max_client_examples``), the default caps on a reply's claimed weight.
    """
    q, server = cfg.quantization, cfg.server
    return LowPrecisionStrategy(
        inner=build_inner_strategy(cfg),
        template=template,
        uplink=uplink_format(q),
        downlink=downlink_format(q),
        moving_average=float(server.moving_average),
        moving_average_start=int(server.moving_average_start),
        moving_average_warmup=bool(server.moving_average_warmup),
        accepted_bits=accepted_bits(cfg),
        weighting=server.weighting,
        float_buffers=() if q.quantize_buffers else float_buffers,
        seed=int(cfg.seed),
        guard=build_update_guard(cfg, bounds),
        max_failed_rounds=int(server.max_failed_rounds),
    )
