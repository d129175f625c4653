"""The server wrappers one by one: sampling, rounds, state trees, clients at several widths."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from client_app.app import app as client_app
from lowprec_fl.protocol import LINEAGE_KEY
from lowprec_fl.wire import decode_tensors, specs_of
from quantization import BlockFloat
from strategies import (
    QuantizedMessages,
    ReproducibleSampling,
    ResumableRun,
    ServerMovingAverage,
    find_wrapper,
    is_traffic_metric,
)
from strategies.sampling import ranked_nodes
from strategies.state import inner_strategy
from tests.flower_harness import InProcessGrid
from tests.shared_helpers import configured_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

RUN_CONFIG = {
    "overrides": "dataset=synthetic federation.num_clients=4 federation.fraction_train=0.5 "
    "train.max_steps=2"
}


class BusyGrid(InProcessGrid):
    """Draws from the global ``random`` on every node listing, as Flower's heartbeat and retry
    threads do at timing-dependent moments in a real ServerApp."""

    def __init__(self, *args, draws: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.draws = draws
        self.sent: list[int] = []

    def get_node_ids(self):
        for _ in range(self.draws):
            random.random()
        return super().get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend(m.metadata.dst_node_id for m in messages)
        return super().send_and_receive(messages, timeout=timeout)


def _setup(run_config: dict = RUN_CONFIG):
    strategy, _, initial = configured_strategy(run_config)
    return strategy, initial


def _final_model(node_ids: list[int], draws: int = 0) -> dict[str, np.ndarray]:
    strategy, initial = _setup()
    grid = BusyGrid(client_app, 4, RUN_CONFIG, node_ids=node_ids, draws=draws)
    random.seed(0)
    torch.set_num_threads(1)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=2)
    return {k: result.arrays[k].numpy() for k in result.arrays}


# ----------------------------------------------------------------------------- sampling
def test_same_seed_trains_the_same_model_whatever_the_node_ids():
    first = _final_model([101, 102, 103, 104])
    second = _final_model([9_000_001, 17, 4_242, 555])  # partitions 0..3 again
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_other_draws_from_the_global_random_do_not_change_the_sample():
    quiet = _final_model([101, 102, 103, 104])
    busy = _final_model([101, 102, 103, 104], draws=7)
    for name in quiet:
        assert np.array_equal(quiet[name], busy[name]), name


def test_sampling_sends_nothing_to_the_nodes_it_does_not_sample():
    """1,000 connected nodes, 10 sampled: configuring a round sends no message at all (the
    old partition query asked every node), and the messages go to 10 nodes."""
    sampling = ReproducibleSampling(FedAvg(fraction_train=0.01, min_available_nodes=1), seed=3)
    grid = BusyGrid(client_app, 1000, RUN_CONFIG, node_ids=list(range(5_000, 6_000)))
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    for server_round in (1, 2):
        messages = list(sampling.configure_train(server_round, arrays, ConfigRecord(), grid))
        assert len({m.metadata.dst_node_id for m in messages}) == 10
    assert grid.sent == []


def test_evaluation_samples_the_same_partitions_whatever_the_node_ids_and_random():
    _, initial = _setup()
    samples = []
    for node_ids, draws in (([11, 22, 33, 44], 0), ([44, 3, 9_999, 12], 5)):
        strategy, _ = _setup(
            {"overrides": RUN_CONFIG["overrides"] + " federation.fraction_evaluate=0.5"}
        )
        grid = BusyGrid(client_app, 4, RUN_CONFIG, node_ids=node_ids, draws=draws)
        partition = {n: grid.contexts[n].node_config["partition-id"] for n in node_ids}
        messages = strategy.configure_evaluate(1, initial, ConfigRecord(), grid)
        samples.append(sorted(partition[m.metadata.dst_node_id] for m in messages))
    assert len(samples[0]) == 2 and samples[0] == samples[1]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_a_joining_node_changes_a_sample_by_at_most_one_node(seed):
    nodes = list(range(100, 150))
    k = 10
    changed = 0
    for server_round in range(1, 40):
        before = set(ranked_nodes(nodes, seed, server_round, "train")[:k])
        after = set(ranked_nodes([*nodes, 999], seed, server_round, "train")[:k])
        assert len(before - after) <= 1 and after - before <= {999}
        changed += before != after
    assert 0 < changed < 39  # the newcomer is sampled now and then, not always


def test_a_leaving_node_is_never_sampled_and_the_sample_keeps_its_size():
    nodes = list(range(100, 130))
    for server_round in range(1, 20):
        sample = ranked_nodes(nodes, 0, server_round, "train")[:5]
        gone = sample[0]
        rest = [n for n in nodes if n != gone]
        new = ranked_nodes(rest, 0, server_round, "train")[:5]
        assert gone not in new and len(new) == 5


def test_samples_differ_between_rounds_phases_and_seeds():
    nodes = list(range(40))
    first = ranked_nodes(nodes, 0, 1, "train")[:8]
    assert first != ranked_nodes(nodes, 0, 2, "train")[:8]
    assert first != ranked_nodes(nodes, 0, 1, "evaluate")[:8]
    assert first != ranked_nodes(nodes, 1, 1, "train")[:8]
    assert first == ranked_nodes(nodes, 0, 1, "train")[:8]  # and repeat exactly


def test_every_node_is_sampled_about_as_often():
    nodes = list(range(20))
    counts = np.zeros(20)
    for server_round in range(1, 1001):
        for n in ranked_nodes(nodes, 0, server_round, "train")[:5]:
            counts[n] += 1
    # 1000 rounds x 5/20: 250 each, binomial sd ~13.7; 5 sd bounds
    assert counts.min() > 180 and counts.max() < 320, counts


# ----------------------------------------------------------------------------- rounds and state
def test_resumable_run_numbers_rounds_from_the_rounds_done_and_keys_the_result_so():
    strategy, initial = _setup()
    strategy.load_state_dict({**strategy.state_dict(), "round": 3})
    grid = InProcessGrid(client_app, 4, RUN_CONFIG)
    seen = []
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=5,
        evaluate_fn=lambda r, a: seen.append(r),
    )
    assert seen == [3, 4, 5]  # initial evaluation as round 3, then the two rounds left
    assert sorted(result.train_metrics_clientapp) == [4, 5]
    assert sorted(strategy.history) == [4, 5] and strategy.current_round == 5
    assert sorted(strategy.messages.traffic) == [4, 5]  # every block saw absolute rounds


def test_lineage_goes_into_every_training_config():
    strategy, initial = _setup()
    grid = InProcessGrid(client_app, 4, RUN_CONFIG)
    messages = strategy.configure_train(1, initial, ConfigRecord({"lr": 0.1}), grid)
    for m in messages:
        config = m.content["config"]
        assert config[LINEAGE_KEY] == strategy.lineage and config["lr"] == 0.1


def test_the_state_tree_round_trips_through_every_wrapper():
    strategy, initial = _setup({"overrides": RUN_CONFIG["overrides"] + " strategy=fedadam"})
    grid = InProcessGrid(client_app, 4, RUN_CONFIG)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=2)
    strategy.messages.failed_rounds = 1
    saved = strategy.state_dict()

    fresh, _ = _setup({"overrides": RUN_CONFIG["overrides"] + " strategy=fedadam"})
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    assert again["round"] == 2 and again["lineage"] == strategy.lineage
    assert fresh.rounds_done == 2 and fresh.messages.failed_rounds == 1
    average = fresh.moving_average
    assert average.num_updates == strategy.moving_average.num_updates == 2
    for name, value in strategy.moving_average.average.items():
        assert np.array_equal(average.average[name], value)
    inner, fresh_inner = inner_strategy(strategy), inner_strategy(fresh)
    assert isinstance(fresh_inner, FedAdam)
    for key in inner.m_t:
        assert np.array_equal(inner.m_t[key], fresh_inner.m_t[key])
        assert np.array_equal(inner.v_t[key], fresh_inner.v_t[key])


def test_a_state_tree_of_another_flower_strategy_is_refused():
    adam, _ = _setup({"overrides": RUN_CONFIG["overrides"] + " strategy=fedadam"})
    avgm, _ = _setup({"overrides": RUN_CONFIG["overrides"] + " strategy=fedavgm"})
    with pytest.raises(ValueError, match="written by FedAdam, not FedAvgM"):
        avgm.load_state_dict(adam.state_dict())


@pytest.mark.parametrize(
    "entry, value, message",
    [
        ("round", -1, "round must be an integer >= 0"),
        ("lineage", "../etc", "lineage must be 32 hex digits"),
    ],
)
def test_a_bad_state_entry_is_refused_with_its_name(entry, value, message):
    strategy, _ = _setup()
    with pytest.raises(ValueError, match=message):
        strategy.load_state_dict({**strategy.state_dict(), entry: value})


def test_wrappers_compose_alone_around_flower_strategies():
    """Each block works without the others, and ``find_wrapper`` finds them in any order."""
    spec = specs_of({"w": torch.zeros(64)})
    fmt = BlockFloat(8, layout="block")
    stack = ServerMovingAverage(QuantizedMessages(FedAvgM(), spec, fmt, fmt), decay=0.5)
    assert find_wrapper(stack, QuantizedMessages).strategy is inner_strategy(stack)
    assert find_wrapper(stack, ReproducibleSampling) is None
    assert isinstance(find_wrapper(stack, FedAvgM), FedAvgM)
    assert set(ResumableRun(stack).state_dict()) == {"round", "lineage", "strategy"}


# ----------------------------------------------------------------------------- several widths
WIDTHS_CONFIG = {
    "overrides": "dataset=synthetic federation.num_clients=3 federation.fraction_train=1.0 "
    "train.max_steps=2 clients.bits=[8,6,4] server.update_clip_factor=0"
}


def test_clients_at_8_6_and_4_bits_upload_at_their_width_and_receive_theirs():
    strategy, initial = _setup(WIDTHS_CONFIG)
    grid = InProcessGrid(client_app, 3, WIDTHS_CONFIG)
    width = {n: (8, 6, 4)[grid.contexts[n].node_config["partition-id"]] for n in grid.contexts}
    uploads: dict[int, list[int]] = {}
    downloads: dict[int, list[int]] = {}

    def bits_of(formats) -> int:
        return {json_bits(v) for v in formats.values()}.pop()

    def json_bits(text: str) -> int:
        import json

        return json.loads(text).get("bits", 32)

    def record(node_id, reply):
        uploads.setdefault(node_id, []).append(bits_of(reply.content["arrays-format"]))
        return reply

    grid.tamper = record
    arrays = initial
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        for m in messages:
            downloads.setdefault(m.metadata.dst_node_id, []).append(
                bits_of(m.content["arrays-format"])
            )
        replies = grid.send_and_receive(messages)
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert arrays is not None and metrics["rejected-replies"] == 0
        assert {k for k in metrics if k.startswith("uplink-bytes-")} == {
            "uplink-bytes-4bit",
            "uplink-bytes-6bit",
            "uplink-bytes-8bit",
        }
        assert sum(metrics[f"uplink-bytes-{b}bit"] for b in (4, 6, 8)) == metrics["uplink-bytes"]
        assert (
            metrics["uplink-bytes-4bit"]
            < metrics["uplink-bytes-6bit"]
            < metrics["uplink-bytes-8bit"]
        )
    for node, bits in width.items():
        assert uploads[node] == [bits, bits]
        assert downloads[node] == [8, bits]  # first contact: the default; then its own width


def test_a_width_outside_the_accepted_set_is_rejected_with_the_widths():
    strategy, initial = _setup(WIDTHS_CONFIG)
    grid = InProcessGrid(
        client_app, 3, {"overrides": WIDTHS_CONFIG["overrides"] + " clients.accepted_bits=[5]"}
    )
    node = sorted(grid.contexts)[0]
    grid.contexts[node].node_config["precision-bits"] = 5  # the server does not accept 5
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    _, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert metrics["rejected-replies"] == 1
    (reason,) = strategy.messages.traffic[1].rejected
    assert "5-bit mantissas; accepted widths: [4, 6, 8]" in reason


def test_a_client_width_the_run_does_not_accept_fails_at_the_client_naming_the_fix():
    grid = InProcessGrid(client_app, 3, WIDTHS_CONFIG)
    strategy, initial = _setup(WIDTHS_CONFIG)
    node = sorted(grid.contexts)[0]
    grid.contexts[node].node_config["precision-bits"] = 5
    (message, *_) = [
        m
        for m in strategy.configure_train(1, initial, ConfigRecord(), grid)
        if m.metadata.dst_node_id == node
    ]
    with pytest.raises(ValueError, match=r"precision-bits asks for 5-bit.*clients.accepted_bits"):
        client_app(message, grid.contexts[node])


def test_traffic_metrics_are_told_apart_from_client_metrics():
    assert is_traffic_metric("uplink-bytes") and is_traffic_metric("downlink-bytes-4bit")
    assert not is_traffic_metric("train-loss") and not is_traffic_metric("payload-bytes")


def test_decoded_widths_are_what_each_client_trained_from():
    """The guard checks each update against the broadcast its client received (its width)."""
    strategy, initial = _setup(WIDTHS_CONFIG)
    grid = InProcessGrid(client_app, 3, WIDTHS_CONFIG)
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, initial, ConfigRecord(), grid))
        strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    references = strategy.messages._references[2]
    assert {fmt.bits for fmt in references} == {8, 6, 4}
    for message in messages:
        sent = decode_tensors(message.content["arrays"], message.content["arrays-format"])
        fmt = strategy.messages._sent[message.metadata.dst_node_id]
        for name, tensor in sent.items():
            assert torch.equal(tensor, references[fmt].tensors[name]), name


def test_without_a_template_the_first_broadcast_pins_the_model():
    fmt = BlockFloat(8, layout="block")
    messages = QuantizedMessages(FedAvg(fraction_train=1.0, min_available_nodes=1), uplink=fmt)
    assert messages.downlink == fmt and messages.template is None
    grid = InProcessGrid(client_app, 2, RUN_CONFIG)
    early = grid.send_and_receive(
        list(
            QuantizedMessages(FedAvg(), uplink=fmt).configure_train(
                1, _setup()[1], ConfigRecord(), grid
            )
        )
    )
    arrays, metrics = messages.aggregate_train(1, early)  # nothing broadcast by this wrapper
    assert arrays is None and metrics["rejected-replies"] == 2
    assert "no model was broadcast yet" in messages.traffic[1].rejected[0]

    _, initial = _setup()
    sent = list(messages.configure_train(2, initial, ConfigRecord(), grid))
    assert set(messages.template) == set(initial.keys())
    arrays, metrics = messages.aggregate_train(2, grid.send_and_receive(sent))
    assert arrays is not None and metrics["rejected-replies"] == 0
