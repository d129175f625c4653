"""Hydra configuration: compose ``conf/`` with run-config overrides and validate the result."""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lowprec_fl.federated_data import DATASET_NAMES, PARTITION_SCHEMES
from lowprec_fl.models import MODEL_NAMES
from lowprec_fl.task.formats import STATE_FORMATS, state_format
from lowprec_fl.task.training import OPTIMIZERS
from quantization import BlockFloat
from quantization.attach import ARITHMETICS
from quantization.format import LAYOUTS
from strategies.factory import INNER_STRATEGIES
from strategies.moving_average import check_decay, check_start_round
from strategies.quantized_messages import WEIGHTINGS

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
#: ``conf/``: shipped inside the package by a wheel install, at the repository root otherwise.
CONF_DIR = next(
    (d for d in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if d.is_dir()),
    _PACKAGE_DIR.parent / "conf",
)
#: Run-config keys with a meaning of their own; every other key (``[tool.flwr.app.config]`` in
#: pyproject.toml declares them) is the Hydra key of the same name.
FREE_FORM_KEY = "overrides"
OUTPUT_DIR_KEY = "output-dir"
BIT_KEYS = (
    "weight_bits",
    "grad_bits",
    "activation_bits",
    "error_bits",
    "state_bits",
    "uplink_bits",
    "downlink_bits",
)


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem and how to fix it."""


def run_config_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides from Flower's run config (``--run-config``); empty values are skipped.

    ``overrides`` holds free-form Hydra overrides, ``output-dir`` sets ``output_dir``, and every
    other key (e.g. ``federation.num_rounds`` or the config group ``quantization``) is the Hydra
    key of the same name: ``{"federation.num_rounds": 20}`` -> ``federation.num_rounds=20``.
    """
    overrides: list[str] = []
    for key, value in run_config.items():
        if value == "" or value is None:
            continue
        if key == FREE_FORM_KEY:
            lexer = shlex.shlex(str(value), posix=False)  # keeps quotes for Hydra
            lexer.whitespace_split = True
            overrides.extend(lexer)
        elif key == OUTPUT_DIR_KEY:
            overrides.append(f"output_dir={_hydra_value(value)}")
        else:
            overrides.append(f"{key}={_hydra_value(value)}")
    return overrides


def _hydra_value(value: Any) -> str:
    """A run-config value as a Hydra override value (quoted when it has special characters)."""
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    if isinstance(value, int | float) or re.fullmatch(r"[\w./:+-]*", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def load_config(
    run_config: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> DictConfig:
    """Compose ``conf/config.yaml`` with run-config keys and extra overrides, then validate."""
    all_overrides = tuple(run_config_overrides(run_config or {})) + tuple(overrides)
    return _compose_cached(all_overrides).copy()


@functools.lru_cache(maxsize=16)
def _compose_cached(overrides: tuple[str, ...]) -> DictConfig:
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(
            f"cannot compose the configuration with overrides {list(overrides)}: {err}. "
            f"Config groups and keys are in {CONF_DIR}."
        ) from None
    validate_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every invalid setting (key, value, what is allowed)."""
    problems: list[str] = []

    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            problems.append(f"{key}={OmegaConf.select(cfg, key)!r}: {rule}")

    def checked(key: str, check: Callable[[Any], None], value: Any) -> None:
        try:
            check(value)
        except (ValueError, TypeError) as err:
            problems.append(f"{key}={value!r}: {err}")

    fed, part, train, server = cfg.federation, cfg.partition, cfg.train, cfg.server
    require(cfg.dataset.name in DATASET_NAMES, "dataset.name", f"use one of {DATASET_NAMES}")
    require(cfg.model.name in MODEL_NAMES, "model.name", f"use one of {MODEL_NAMES}")
    strategies = tuple(INNER_STRATEGIES)
    require(cfg.strategy.name in strategies, "strategy.name", f"use one of {strategies}")
    require(cfg.device in ("auto", "cpu", "cuda"), "device", "use auto, cpu or cuda")
    require(
        cfg.device != "cuda" or torch.cuda.is_available(),
        "device",
        "CUDA is not available here: use device=auto or device=cpu",
    )
    require(
        cfg.output_dir == "" or Path(cfg.output_dir).is_absolute(),
        "output_dir",
        "must be an absolute path (the ServerApp runs in the SuperLink's directory)",
    )
    require(fed.num_rounds >= 1, "federation.num_rounds", "must be >= 1")
    require(fed.num_clients >= 1, "federation.num_clients", "must be >= 1")
    require(0 < fed.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]")
    require(0 <= fed.fraction_evaluate <= 1, "federation.fraction_evaluate", "must be in [0, 1]")
    for key in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
        require(fed[key] >= 1, f"federation.{key}", "must be >= 1")
    require(fed.round_timeout > 0, "federation.round_timeout", "must be > 0 seconds")
    require(part.scheme in PARTITION_SCHEMES, "partition.scheme", f"use one of {PARTITION_SCHEMES}")
    require(part.alpha > 0, "partition.alpha", "must be > 0")
    require(0 <= part.test_fraction < 1, "partition.test_fraction", "must be in [0, 1)")
    require(
        fed.fraction_evaluate == 0 or part.test_fraction > 0,
        "partition.test_fraction",
        "must be > 0 when federation.fraction_evaluate > 0 (clients evaluate on it)",
    )
    require(train.local_epochs >= 1, "train.local_epochs", "must be >= 1")
    require(train.batch_size >= 1, "train.batch_size", "must be >= 1")
    optimizers = tuple(OPTIMIZERS)
    require(train.optimizer in optimizers, "train.optimizer", f"use one of {optimizers}")
    require(train.lr > 0, "train.lr", "must be > 0")
    require(train.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no cap)")
    require(train.threads >= 1, "train.threads", "must be >= 1")
    require(
        isinstance(train.state_dir, str)
        and (train.state_dir == "" or Path(train.state_dir).is_absolute()),
        "train.state_dir",
        "must be an absolute path or empty (the ClientApp runs in the SuperNode's directory)",
    )
    checked("server.moving_average", check_decay, server.moving_average)
    checked("server.moving_average_start", check_start_round, server.moving_average_start)
    require(server.weighting in WEIGHTINGS, "server.weighting", f"use one of {WEIGHTINGS}")
    require(server.eval_batch_size >= 1, "server.eval_batch_size", "must be >= 1")
    require(server.max_num_examples >= 0, "server.max_num_examples", "must be >= 0 (0 = auto)")
    require(
        server.max_update_norm_ratio >= 0, "server.max_update_norm_ratio", "must be >= 0 (0 = off)"
    )
    require(
        server.update_clip_factor == 0 or server.update_clip_factor >= 1,
        "server.update_clip_factor",
        "must be 0 (off) or >= 1",
    )
    require(server.max_failed_rounds >= 0, "server.max_failed_rounds", "must be >= 0 (0 = never)")
    require(
        not server.resume or cfg.output_dir != "",
        "server.resume",
        "needs output_dir set to the folder of the run to continue",
    )
    q = cfg.quantization
    require(q.weight_layout in LAYOUTS, "quantization.weight_layout", f"use one of {LAYOUTS}")
    require(q.wire_layout in LAYOUTS, "quantization.wire_layout", f"use one of {LAYOUTS}")
    require(train.arithmetic in ARITHMETICS, "train.arithmetic", f"use one of {ARITHMETICS}")
    require(
        train.arithmetic != "int8" or q.weight_layout in ("channel", "tensor"),
        "quantization.weight_layout",
        "train.arithmetic=int8 needs one weight exponent per output channel or per tensor: "
        "set quantization.weight_layout=channel (or tensor)",
    )
    formats = STATE_FORMATS
    require(q.state_format in formats, "quantization.state_format", f"use one of {formats}")
    if q.state_format in formats:
        checked("quantization.state_bits", lambda _: state_format(q), q.state_bits)
    for key in BIT_KEYS:
        try:
            BlockFloat(int(q[key]), q.wire_layout, q.rounding, int(q.block_size))
        except (ValueError, TypeError) as err:
            problems.append(f"quantization.{key}={q[key]!r}: {err}")
    for key in ("clients.bits", "clients.accepted_bits"):
        for bits in OmegaConf.select(cfg, key):
            try:
                BlockFloat(bits, q.wire_layout, q.rounding, int(q.block_size))
            except (ValueError, TypeError) as err:
                problems.append(f"{key} has {bits!r}: {err}")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(dict.fromkeys(problems)))


def resolve_device(cfg: DictConfig) -> torch.device:
    """The torch device the config asks for (``auto`` picks CUDA when available)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)
