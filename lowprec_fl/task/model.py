"""Build the configured model, seeded so every party starts from the same weights."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lowprec_fl.models import build_model

from .data import data_shape


def build_configured_model(cfg: DictConfig) -> nn.Module:
    """The model ``cfg.model`` names, shaped for ``cfg.dataset``, initialised from ``cfg.seed``."""
    channels, image_size, classes = data_shape(cfg)
    options = OmegaConf.to_container(cfg.model, resolve=True)
    name = options.pop("name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(name, channels, classes, image_size, **options)


def float_buffer_names(model: nn.Module) -> set[str]:
    """Names of floating-point buffers (e.g. BatchNorm running statistics)."""
    return {name for name, b in model.named_buffers() if b.is_floating_point()}
