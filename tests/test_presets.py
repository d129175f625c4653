"""The paper presets compose into the paper's setting, and its sweep's overrides apply."""

from __future__ import annotations

import pytest

from lowprec_fl.task.config import load_config

PAPER_DATASETS = {
    "fmnist": "fashion_mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "mnist": "mnist",
}


@pytest.mark.parametrize("preset", list(PAPER_DATASETS))
def test_paper_preset_is_the_papers_setting(preset: str) -> None:
    cfg = load_config({"overrides": f"preset=paper_{preset}"})
    assert cfg.dataset.name == PAPER_DATASETS[preset]
    assert cfg.model.name == "convnet" and cfg.model.width == 128 and cfg.model.depth == 3
    assert (cfg.federation.num_clients, cfg.federation.fraction_train) == (80, 0.4)
    assert cfg.federation.num_rounds == 200 and cfg.train.local_epochs == 1
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == ("adam", 0.001, 32)
    assert cfg.partition.scheme == "balanced_dirichlet" and cfg.partition.alpha == 0.01
    assert cfg.server.moving_average == 0.9 and cfg.server.moving_average_start == 1
    assert not cfg.server.moving_average_warmup and cfg.server.weighting == "uniform"


def test_paper_table_overrides_apply_on_top_of_a_preset() -> None:
    overrides = (
        "preset=paper_cifar10 partition.alpha=0.16 server.moving_average=0 quantization=bfp6"
    )
    cfg = load_config({"overrides": overrides})
    assert cfg.partition.alpha == 0.16 and cfg.server.moving_average == 0
    assert cfg.quantization.weight_bits == 6 and cfg.federation.num_clients == 80
