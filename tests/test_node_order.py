"""Client sampling is reproducible although node ids are random (as in Flower's simulation)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from client_app.app import app as client_app
from lowprec_fl.wire import specs_of
from strategies.factory import build_strategy
from strategies.node_order import PartitionOrder
from task.config import load_config
from task.model import build_configured_model, float_buffer_names
from tests.flower_harness import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_task")

RUN_CONFIG = {
    "overrides": "dataset=synthetic federation.num_clients=4 federation.fraction_train=0.5 "
    "train.max_steps=2"
}


class BusyGrid(InProcessGrid):
    """Draws from the global ``random`` on every node listing, as Flower's heartbeat and retry
    threads do at timing-dependent moments in a real ServerApp."""

    def __init__(self, *args, draws: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.draws = draws

    def get_node_ids(self):
        for _ in range(self.draws):
            random.random()
        return super().get_node_ids()


def _final_model(
    node_ids: list[int], draws: int = 0
) -> tuple[dict[str, np.ndarray], PartitionOrder]:
    cfg = load_config(RUN_CONFIG)
    model = build_configured_model(cfg)
    template = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(cfg, specs_of(template), float_buffer_names(model))
    grid = BusyGrid(client_app, 4, RUN_CONFIG, node_ids=node_ids, draws=draws)
    random.seed(0)
    torch.set_num_threads(1)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v.numpy()) for k, v in template.items()}),
        num_rounds=2,
        train_config=ConfigRecord(),
    )
    return {k: result.arrays[k].numpy() for k in result.arrays}, strategy.partition_order


def test_same_seed_samples_the_same_partitions_whatever_the_node_ids():
    first, order = _final_model([101, 102, 103, 104])
    second, other_order = _final_model([9_000_001, 17, 4_242, 555])  # partitions 0..3
    assert order.partitions == {101: 0, 102: 1, 103: 2, 104: 3}
    assert other_order.sorted([17, 555, 4_242, 9_000_001]) == [9_000_001, 17, 4_242, 555]
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_other_draws_from_the_global_random_do_not_change_the_sample():
    quiet, _ = _final_model([101, 102, 103, 104])
    busy, _ = _final_model([101, 102, 103, 104], draws=7)
    for name in quiet:
        assert np.array_equal(quiet[name], busy[name]), name


def test_evaluation_samples_the_same_nodes_whatever_else_drew_from_random():
    cfg = load_config({"overrides": RUN_CONFIG["overrides"] + " federation.fraction_evaluate=0.5"})
    model = build_configured_model(cfg)
    template = {k: Array(v.numpy()) for k, v in model.state_dict().items()}
    samples = []
    for draws in (0, 5):
        strategy = build_strategy(cfg, specs_of(model.state_dict()), float_buffer_names(model))
        grid = BusyGrid(client_app, 4, RUN_CONFIG, node_ids=[11, 22, 33, 44], draws=draws)
        random.seed(0)
        messages = strategy.configure_evaluate(1, ArrayRecord(template), ConfigRecord(), grid)
        samples.append(sorted(m.metadata.dst_node_id for m in messages))
    assert len(samples[0]) == 2 and samples[0] == samples[1]


def test_nodes_are_asked_once_and_unknown_nodes_sort_last():
    order = PartitionOrder()
    grid = InProcessGrid(client_app, 2, RUN_CONFIG, node_ids=[50, 40])
    order.learn(grid)
    order.learn(grid)  # nothing new to ask
    assert order.partitions == {50: 0, 40: 1} and order.asked == {40, 50}
    assert order.sorted([7, 40, 50]) == [50, 40, 7]
