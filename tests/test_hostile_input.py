"""Hostile and broken input at every trust boundary: each case once got through (issue #12).

Server: replies that crash, poison or bloat it. Client: broadcasts that bloat it and run
lineages that point outside its state directory. Files: damaged checkpoints and state files.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client_app.app import app as client_app
from client_app.state import (
    StateDirectoryError,
    read_round_state,
    state_directory,
    write_round_state,
)
from lowprec_fl.protocol import LINEAGE_KEY
from lowprec_fl.task.config import load_config
from lowprec_fl.task.data import client_data, max_client_examples
from lowprec_fl.task.verified_file import load_verified, save_verified
from lowprec_fl.wire import decode_tensors, specs_of
from server_app.app import main
from server_app.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_fits,
    load_checkpoint,
    save_checkpoint,
)
from server_app.results import ResultsWriter
from strategies import FederationStalledError
from strategies.update_guard import UpdateGuard
from tests.flower_harness import InProcessGrid
from tests.test_client_app import _context, _message
from tests.test_client_app import _run_config as _client_run_config
from tests.test_strategy import (
    DOWNLINK,
    FLOAT_BUFFERS,
    FakeGrid,
    _client_state,
    _content,
    _initial,
    _reply,
    _requests,
    _strategy,
    _template,
)
from tests.test_strategy import _decoded as _decoded_reply

pytestmark = pytest.mark.usefixtures("flower_task")
LINEAGE = "0123456789abcdef" * 2


def _honest(requests, template=None) -> list[Message]:
    return [
        _reply(r, _content(_client_state(r.metadata.dst_node_id, template), seed=i))
        for i, r in enumerate(requests)
    ]


def _rejected_nodes(strategy, server_round: int) -> list[int]:
    return sorted(int(r.split(":")[0].split()[1]) for r in strategy.traffic[server_round].rejected)


def _arrays_equal(a, b) -> bool:
    return set(a.keys()) == set(b.keys()) and all(
        np.array_equal(a[k].numpy(), b[k].numpy()) for k in a
    )


def _reference_aggregate(replies_factory, template=None):
    """The aggregate of the honest replies alone, on a fresh strategy (same round 1)."""
    strategy = _strategy(template)
    requests = _requests(strategy, 1, template)
    return strategy.aggregate_train(1, replies_factory(requests))


# ----------------------------------------------------------------------------- 1. BatchNorm
def test_zero_dim_buffers_keep_their_shape_into_the_next_broadcast():
    """FedAvg returns 0-d buffers (num_batches_tracked) as shape (1,); clients expect ()."""
    template = _template()
    strategy = _strategy(template)
    arrays, _ = strategy.aggregate_train(1, _honest(_requests(strategy, 1)))
    assert tuple(arrays["bn.num_batches_tracked"].shape) == ()
    (message, *_) = strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid())
    decoded = decode_tensors(
        message.content["arrays"],
        message.content["arrays-format"],
        expected=specs_of(template),  # raised "has shape (1,), expected ()" before the fix
        fmt=DOWNLINK,
        allow_float=FLOAT_BUFFERS,
    )
    assert decoded["bn.num_batches_tracked"].shape == ()


def test_stalled_federation_stops_with_a_clear_error():
    strategy = _strategy(max_failed_rounds=2)
    for server_round in (1, 2):
        requests = _requests(strategy, server_round)
        bad = [_reply(r, _content(_client_state(11), bits=8)) for r in requests]  # wrong width
        if server_round == 1:
            arrays, metrics = strategy.aggregate_train(server_round, bad)
            assert arrays is None and metrics["rejected-replies"] == len(bad)
        else:
            with pytest.raises(FederationStalledError, match="last 2 rounds") as info:
                strategy.aggregate_train(server_round, bad)
            assert "8-bit mantissas, expected 4" in str(info.value)
            assert "server.max_failed_rounds" in str(info.value)


def test_one_good_round_resets_the_stall_count():
    strategy = _strategy(max_failed_rounds=2)
    outcomes = []
    for server_round, good in [(1, False), (2, True), (3, False)]:
        requests = _requests(strategy, server_round)
        bits = 4 if good else 8
        replies = [_reply(r, _content(_client_state(11), bits=bits)) for r in requests]
        outcomes.append(strategy.aggregate_train(server_round, replies)[0] is not None)
    assert outcomes == [False, True, False] and strategy.messages.failed_rounds == 1


def test_server_app_stops_when_no_client_succeeds(tmp_path: Path):
    """The real ServerApp loop: every client fails, the run ends in an error, not "success"."""
    run_config = {
        "overrides": "dataset=synthetic federation.num_rounds=6 federation.num_clients=2 "
        "federation.fraction_train=1 train.max_steps=1 server.max_failed_rounds=2",
        "output-dir": str(tmp_path),
    }

    grid = InProcessGrid(_failing_client, 2, run_config, client_errors=True)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with pytest.raises(FederationStalledError, match="last 2 rounds.*CUDA out of memory"):
        main(grid, context)
    rows = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1]  # round 2 raised before it was recorded


def _failing_client(message: Message, context: Context) -> Message:
    raise RuntimeError("CUDA out of memory (simulated)")


# ----------------------------------------------------------------------------- 2. metrics
def test_a_list_metric_cannot_crash_aggregation():
    strategy = _strategy()
    requests = _requests(strategy)
    replies = _honest(requests[:2])
    odd = _content(_client_state(13), metrics={"num-examples": 10, "train-loss": [0.5, 0.25]})
    replies.append(_reply(requests[2], odd))
    arrays, metrics = strategy.aggregate_train(1, replies)  # raised TypeError before
    assert arrays is not None and strategy.traffic[1].rejected == []
    # most replies send a number: the list is left out (logged), the others still count
    assert metrics["train-loss"] == pytest.approx((1.0 + 2.0) / 2)

    evaluated = strategy.aggregate_evaluate(
        1,
        [
            _reply(requests[0], RecordDict({"m": MetricRecord({"num-examples": 5, "acc": 0.5})})),
            _reply(requests[1], RecordDict({"m": MetricRecord({"num-examples": 5, "acc": [0.1]})})),
        ],
    )
    assert evaluated["acc"] == 0.5  # a tie: the first reply's form (a number) counts


def test_a_metric_one_client_omits_is_averaged_over_the_others():
    strategy = _strategy()
    requests = _requests(strategy)
    metrics = [
        {"num-examples": 10, "train-loss": 1.0, "extra": 7.0},
        {"num-examples": 30, "train-loss": 3.0},
        {"num-examples": 20, "train-loss": 2.0, "extra": 1.0},
    ]
    replies = [
        _reply(r, _content(_client_state(r.metadata.dst_node_id), metrics=m))
        for r, m in zip(requests, metrics, strict=False)
    ]
    _, aggregated = strategy.aggregate_train(1, replies)
    assert aggregated["train-loss"] == pytest.approx((10 * 1 + 30 * 3 + 20 * 2) / 60)
    assert aggregated["extra"] == pytest.approx((10 * 7 + 20 * 1) / 30)  # was dropped for all


# ----------------------------------------------------------------------------- 3. poisoning
def test_a_finite_but_absurd_model_is_rejected():
    template = _template()
    strategy = _strategy(template)
    requests = _requests(strategy)
    replies = _honest(requests[:3])
    poisoned = {
        k: v * 1e30 if v.is_floating_point() else v
        for k, v in _client_state(requests[3].metadata.dst_node_id).items()
    }
    replies.append(_reply(requests[3], _content(poisoned)))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert _rejected_nodes(strategy, 1) == [requests[3].metadata.dst_node_id]
    assert "update norm" in strategy.traffic[1].rejected[0]
    expected, _ = _reference_aggregate(lambda rs: _honest(rs[:3]))
    assert _arrays_equal(arrays, expected)
    assert max(float(np.abs(arrays[k].numpy()).max()) for k in arrays) < 100


def test_a_claimed_weight_above_the_cap_is_rejected():
    strategy = _strategy(guard=UpdateGuard(max_weight=100))
    requests = _requests(strategy)
    replies = _honest(requests[:3])
    liar = _content(_client_state(14), num_examples=1e12)
    replies.append(_reply(requests[3], liar))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert _rejected_nodes(strategy, 1) == [requests[3].metadata.dst_node_id]
    assert "claims 1e+12 examples" in strategy.traffic[1].rejected[0]
    expected, _ = _reference_aggregate(lambda rs: _honest(rs[:3]))
    assert _arrays_equal(arrays, expected)


def test_default_weight_caps_are_what_the_largest_partition_can_train_and_evaluate_on():
    overrides = "dataset=synthetic partition.scheme=dirichlet partition.alpha=0.3 seed=3"
    for extra, epochs in [("train.local_epochs=2", 2), ("train.local_epochs=1", 1)]:
        cfg = load_config({"overrides": f"{overrides} {extra}"})
        splits = [client_data(cfg, i, 5) for i in range(5)]
        assert len({len(train) for train, _ in splits}) > 1  # unequal: the cap is the largest
        bounds = max_client_examples(cfg, 5)
        assert bounds.train == epochs * max(len(train) for train, _ in splits)
        assert bounds.evaluate == max(len(test) for _, test in splits)
    capped = load_config({"overrides": f"{overrides} train.max_steps=2 train.batch_size=3"})
    assert max_client_examples(capped, 5).train == 6


def test_evaluation_claims_have_their_own_cap():
    strategy = _strategy(guard=UpdateGuard(max_weight=1000, max_eval_weight=50))
    requests = _requests(strategy)
    replies = [
        _reply(r, RecordDict({"m": MetricRecord({"num-examples": n, "acc": 0.5})}))
        for r, n in zip(requests, [40, 50, 51, 400], strict=True)
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert _rejected_nodes(strategy, 1) == [r.metadata.dst_node_id for r in requests[2:]]
    assert "more than any client can evaluate on" in strategy.traffic[1].rejected[0]
    assert metrics["acc"] == 0.5


def test_an_outlier_update_is_clipped_to_a_multiple_of_the_round_median():
    template = _template()
    strategy = _strategy(template, guard=UpdateGuard(max_norm_ratio=0, clip_factor=2))
    requests = _requests(strategy)
    reference = {k: torch.from_numpy(v) for k, v in _reference_broadcast(strategy).items()}
    states = [_client_state(r.metadata.dst_node_id) for r in requests]
    states[0] = {  # 8x the others' update
        k: reference[k] + 8 * (v - reference[k]) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    pairs = zip(requests, states, strict=True)
    replies = [_reply(r, _content(s, seed=i)) for i, (r, s) in enumerate(pairs)]
    contents = [r.content for r in replies]
    decoded = [_decoded_reply(c) for c in contents]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.traffic[1].clipped == 1 and strategy.traffic[1].rejected == []

    def norm(d):
        return np.sqrt(sum(((d[k] - reference[k].double().numpy()) ** 2).sum() for k in FLOATS))

    norms = [norm(d) for d in decoded]
    threshold = 2 * sorted(norms)[(len(norms) - 1) // 2]
    scale = threshold / norms[0]
    for name in FLOATS:
        ref = reference[name].double().numpy()
        clipped = ref + (decoded[0][name] - ref) * scale
        expected = (clipped + sum(d[name] for d in decoded[1:])) / 4
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-5, atol=1e-6)


FLOATS = [k for k, v in _template().items() if v.is_floating_point()]


def _reference_broadcast(strategy) -> dict[str, np.ndarray]:
    (references,) = strategy.messages._references.values()
    reference = references[strategy.messages.downlink]
    return {k: v.numpy() for k, v in reference.tensors.items()}


# ----------------------------------------------------------------------------- 4. message size
def _relabel(content: RecordDict, **changes) -> RecordDict:
    formats = content["arrays-format"]
    edited = {}
    for name, text in formats.items():
        description = json.loads(text)
        if "bits" in description:
            description.update(changes)
        edited[name] = json.dumps(description)
    return RecordDict({**dict(content.items()), "arrays-format": ConfigRecord(edited)})


def test_relabelled_huge_blocks_are_refused():
    """One exponent a tensor, relabelled as a 2**24-element block: same values, 254 MiB padding."""
    template = _template()
    strategy = _strategy(template)
    requests = _requests(strategy)
    replies = _honest(requests[:3])
    tensor_layout = _content(_client_state(14), seed=3)
    # relabel only what already has one exponent, so the payload stays consistent
    formats = tensor_layout["arrays-format"]
    edited = {}
    for name, text in formats.items():
        description = json.loads(text)
        if "bits" in description and tuple(tensor_layout["arrays"][name + "::exponents"].shape) == (
            1,
        ):
            description.update(layout="block", block_size=2**24)
        edited[name] = json.dumps(description)
    bad = RecordDict({**dict(tensor_layout.items()), "arrays-format": ConfigRecord(edited)})
    assert edited != dict(formats.items())
    replies.append(_reply(requests[3], bad))
    strategy.aggregate_train(1, replies)
    assert _rejected_nodes(strategy, 1) == [requests[3].metadata.dst_node_id]
    assert "has blocks of 16777216 elements" in strategy.traffic[1].rejected[0]


@pytest.mark.parametrize("where", ["format record", "extra ConfigRecord"])
def test_a_bloated_reply_is_refused(where: str):
    strategy = _strategy()
    requests = _requests(strategy)
    content = _content(_client_state(11))
    filler = "x" * (2 << 20)  # 2 MB of JSON text against a ~10 kB model
    if where == "format record":
        formats = dict(content["arrays-format"].items())
        formats["fc.bias"] = json.dumps({**json.loads(formats["fc.bias"]), "note": filler})
        content["arrays-format"] = ConfigRecord(formats)
    else:
        content["junk"] = ConfigRecord({"junk": filler})
    strategy.aggregate_train(1, [*_honest(requests[1:]), _reply(requests[0], content)])
    assert _rejected_nodes(strategy, 1) == [requests[0].metadata.dst_node_id]
    assert "exceeds the limit" in strategy.traffic[1].rejected[0]


def test_client_refuses_a_broadcast_with_foreign_blocks_or_bloat():
    run_config = _client_run_config()
    message = _message(run_config)
    message.content = _relabel(message.content, layout="block", block_size=2**24)
    reply = client_app(message, _context(run_config))
    assert reply.has_error() and "has blocks of 16777216 elements" in reply.error.reason
    message = _message(run_config)
    message.content["junk"] = ConfigRecord({"junk": "x" * (4 << 20)})
    reply = client_app(message, _context(run_config))
    assert reply.has_error()
    assert re.search("the broadcast is .* bytes, more than the limit", reply.error.reason)


# ----------------------------------------------------------------------------- 5. lineage
@pytest.mark.parametrize(
    "lineage", ["/etc", "../../..", "a/../../b", LINEAGE + "/..", LINEAGE.upper(), "x\x00y"]
)
def test_client_refuses_a_lineage_that_could_leave_its_state_directory(
    tmp_path: Path, lineage: str
):
    root = tmp_path / "state"
    root.mkdir()
    sentinels = [tmp_path / "round-1.safetensors", tmp_path / "x.tmp"]
    for path in sentinels:
        path.write_text("keep me")
    run_config = _client_run_config(f"train.state_dir={root}")
    message = _message(run_config, config={LINEAGE_KEY: lineage})
    with pytest.raises(StateDirectoryError, match="not 32 lowercase hex digits"):
        client_app(message, _context(run_config))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["round-1.safetensors", "state", "x.tmp"]
    assert all(path.read_text() == "keep me" for path in sentinels)


def test_the_servers_own_lineage_is_accepted(tmp_path: Path):
    run_config = _client_run_config(f"train.state_dir={tmp_path}")
    reply = client_app(_message(run_config, config={LINEAGE_KEY: LINEAGE}), _context(run_config))
    assert not reply.has_error()
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors")] == [
        f"{LINEAGE}/partition-0/round-1.safetensors"
    ]


# ----------------------------------------------------------------------------- 6. files
def _checkpoint(tmp_path: Path):
    """A real checkpoint after one FedAdam round with the moving average on."""
    cfg = load_config({"overrides": "dataset=synthetic strategy=fedadam"})
    from lowprec_fl.task.model import build_configured_model, float_buffer_names
    from strategies.factory import build_strategy
    from strategies.state import load_strategy_state

    model = build_configured_model(cfg)
    template = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(cfg, specs_of(template), float_buffer_names(model))
    state = {k: v.numpy() for k, v in template.items()}
    load_strategy_state(  # FedAdam after a round: its reference model and both moments
        strategy,
        {f"{a}/{k}": v for a in ("current_arrays", "m_t", "v_t") for k, v in state.items()},
    )
    strategy.moving_average.update(1, state)
    strategy.moving_average.update(2, {k: v + 1 for k, v in state.items()})
    save_checkpoint(tmp_path, 2, state, strategy)
    return tmp_path / CHECKPOINT_NAME, specs_of(template)


def _rewrite(path: Path, tensors=None, **metadata) -> None:
    """Rewrite a checkpoint with a *valid* digest: a hand-crafted file, not a damaged one."""
    old_tensors, old_metadata = load_verified(path)
    save_verified(path, tensors or old_tensors, {**old_metadata, **metadata})


def test_a_bit_flip_in_a_checkpoint_is_refused_naming_the_file(tmp_path: Path):
    path, template = _checkpoint(tmp_path)
    assert check_fits(load_checkpoint(tmp_path), template, path) is None
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data: safetensors alone loads it silently
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}.*do not match its digest"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"round": "-5"}, "'round' must be an integer >= 0"),
        ({"num_updates": "-3"}, "'num_updates' must be an integer >= 0"),
        ({"round": "2.5"}, "'round' must be an integer >= 0"),
        ({"random_state": "[1, 2]"}, "metadata is invalid"),
        ({"lineage": "../../x"}, "'lineage' must be 32 hex digits"),
        ({"strategy": '"FedAdam"'}, "'strategy' must be a JSON object"),
        (
            {"strategy": '{"class": "FedAdam", "order": [], "none": [], "dtypes": {}}'},
            "'strategy.order'",
        ),
        ({"random_state": json.dumps([3, [-1] * 625, None])}, "words must be integers"),
        ({"random_state": "[]"}, "'random_state' must be"),
        ({"round": "[" * 3000 + "]" * 3000}, "RecursionError"),
    ],
)
def test_nonsense_checkpoint_metadata_is_refused(tmp_path: Path, metadata, problem):
    path, _ = _checkpoint(tmp_path)
    _rewrite(path, **metadata)
    with pytest.raises(CheckpointError, match=f"{path}") as info:
        load_checkpoint(tmp_path)
    assert problem in str(info.value)


def test_missing_checkpoint_metadata_is_a_clear_error_not_a_key_error(tmp_path: Path):
    path, _ = _checkpoint(tmp_path)
    tensors, metadata = load_verified(path)
    del metadata["num_updates"]
    save_verified(path, tensors, metadata)
    with pytest.raises(CheckpointError, match="metadata is invalid .*KeyError.*num_updates"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["inf in the average", "wrong shape", "strategy nan"])
def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path: Path, damage: str):
    path, template = _checkpoint(tmp_path)
    tensors, _ = load_verified(path)
    name = next(k for k in template if template[k].dtype.is_floating_point)
    if damage == "inf in the average":
        tensors[f"average/{name}"] = np.full_like(tensors[f"average/{name}"], np.inf)
        want = "moving average's .* holds NaN or inf"
    elif damage == "wrong shape":
        tensors[f"model/{name}"] = np.zeros((3, 3), np.float32)
        want = "has shape \\(3, 3\\)"
    else:
        key = next(k for k in tensors if k.startswith("strategy/"))
        tensors[key] = np.full_like(tensors[key], np.nan)
        want = "strategy state .* holds NaN or inf"
    _rewrite(path, tensors=tensors)
    checkpoint = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=want):
        check_fits(checkpoint, template, path)


def test_resume_refuses_a_damaged_checkpoint_before_training(tmp_path: Path):
    run_config = {
        "overrides": "dataset=synthetic federation.num_rounds=3 federation.num_clients=2 "
        "federation.fraction_train=1 train.max_steps=1 server.resume=true",
        "output-dir": str(tmp_path),
    }
    path, _ = _checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    calls = []

    def client(message, context):
        calls.append(message)
        return client_app(message, context)

    grid = InProcessGrid(client, 2, run_config)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with pytest.raises(CheckpointError, match=f"cannot resume from {path}"):
        main(grid, context)
    assert [m for m in calls if m.metadata.message_type.startswith("train")] == []


def test_a_damaged_results_file_is_a_clear_error(tmp_path: Path):
    (tmp_path / "results.json").write_text('{"rounds": [{"round": 1}]}')
    with pytest.raises(ValueError, match="results.json is damaged"):
        ResultsWriter(tmp_path, {}).load_rows(up_to=1)


def _state_file(tmp_path: Path) -> tuple[Path, RecordDict]:
    run_config = _client_run_config(f"train.state_dir={tmp_path}")
    context = _context(run_config)
    client_app(_message(run_config, config={LINEAGE_KEY: LINEAGE}), context)
    cfg = load_config(run_config)
    return state_directory(cfg, {}, "partition-0", LINEAGE), context.state


def test_a_damaged_client_state_file_is_logged_and_the_client_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    directory, _ = _state_file(tmp_path)
    path = directory / "round-1.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    assert read_round_state(directory, 2) is None
    assert str(path) in caplog.text and "damaged" in caplog.text

    # the real client: it trains round 2 from a fresh state and writes a good file again
    run_config = _client_run_config(f"train.state_dir={tmp_path}")
    message = _message(run_config, config={LINEAGE_KEY: LINEAGE}, server_round=2)
    reply = client_app(message, _context(run_config))
    assert not reply.has_error()
    assert read_round_state(directory, 3) is not None


def test_client_state_that_does_not_fit_the_model_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    directory, state = _state_file(tmp_path)
    arrays = state.array_records["optimizer-state"]
    first = next(k for k in arrays if not k.endswith("::exponents") and arrays[k].shape != [])
    broken = RecordDict(
        {
            "optimizer-state": type(arrays)(
                {**dict(arrays.items()), first: Array(np.zeros(3, arrays[first].numpy().dtype))}
            ),
            "optimizer-state-format": state.config_records["optimizer-state-format"],
        }
    )
    write_round_state(directory, 1, broken)
    caplog.set_level(logging.WARNING)
    run_config = _client_run_config(f"train.state_dir={tmp_path}")
    message = _message(run_config, config={LINEAGE_KEY: LINEAGE}, server_round=2)
    reply = client_app(message, _context(run_config))
    assert not reply.has_error()
    assert "starting afresh" in caplog.text


# ----------------------------------------------------------------------------- 7. replays
def test_a_replayed_reply_counts_once():
    strategy = _strategy()
    requests = _requests(strategy)
    replies = _honest(requests)
    replay = _reply(requests[0], _content(_client_state(99), seed=9))  # same node, other model
    arrays, _ = strategy.aggregate_train(1, [*replies, replay])
    assert _rejected_nodes(strategy, 1) == [requests[0].metadata.dst_node_id]
    assert "second reply" in strategy.traffic[1].rejected[0]
    expected, _ = _reference_aggregate(_honest)
    assert _arrays_equal(arrays, expected)


# ----------------------------------------------------------------------------- robust inner
@pytest.mark.parametrize(
    ("inner", "clients", "resists"),
    [
        ("FedAvg", 5, False),
        ("FedMedian", 3, True),
        ("FedTrimmedAvg", 3, False),  # beta=0.2 trims int(0.2 * 3) = 0 per side
        ("FedTrimmedAvg", 5, True),  # trims 1 per side
    ],
)
def test_which_inner_strategies_resist_one_bad_client_on_their_own(inner, clients, resists):
    """With the server's own guard off: what the README says of each inner strategy."""
    from flwr.serverapp import strategy as flwr_strategies

    nodes = list(range(11, 11 + clients))
    strategy = _strategy(
        inner=getattr(flwr_strategies, inner)(fraction_train=1.0, min_available_nodes=1),
        guard=UpdateGuard(max_norm_ratio=0, clip_factor=0),
    )
    grid = FakeGrid(nodes)
    requests = sorted(
        strategy.configure_train(1, _initial(_template()), ConfigRecord(), grid),
        key=lambda m: m.metadata.dst_node_id,
    )
    for m in requests:
        m.metadata.__dict__["_message_id"] = f"request-{m.metadata.dst_node_id}"
    replies = _honest(requests[:-1])
    bad = {k: v * 1e6 if v.is_floating_point() else v for k, v in _template().items()}
    replies.append(_reply(requests[-1], _content(bad)))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.traffic[1].rejected == []  # it passes every format check
    largest = max(float(np.abs(arrays[k].numpy()).max()) for k in FLOATS)
    assert (largest < 10) == resists, largest


def test_metrics_that_would_overflow_the_average_are_refused():
    strategy = _strategy()
    requests = _requests(strategy)
    replies = _honest(requests[:2])
    huge = _content(_client_state(13), metrics={"num-examples": 10, "train-loss": 1e308})
    replies.append(_reply(requests[2], huge))  # math.fsum raised OverflowError on two of them
    replies.append(_reply(requests[3], _content(_client_state(14), metrics=dict(huge["metrics"]))))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert _rejected_nodes(strategy, 1) == [r.metadata.dst_node_id for r in requests[2:]]
    assert "beyond" in strategy.traffic[1].rejected[0]
    assert arrays is not None and np.isfinite(metrics["train-loss"])


def test_a_non_finite_aggregate_is_never_broadcast():
    """An inner strategy whose result is NaN (e.g. a diverged server optimizer): the model
    stays as it was, and repeated failures stop the run."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    class Diverged(FedAvg):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            nan = {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}
            return ArrayRecord(nan), metrics

    strategy = _strategy(inner=Diverged(fraction_train=1.0), max_failed_rounds=2)
    arrays, metrics = strategy.aggregate_train(1, _honest(_requests(strategy)))
    assert arrays is None and metrics["train-loss"] > 0
    with pytest.raises(FederationStalledError, match="Diverged aggregate has NaN or inf"):
        strategy.aggregate_train(2, _honest(_requests(strategy, 2)))


def test_a_state_file_with_an_unexplained_array_is_refused(tmp_path: Path):
    """An exponents array for a tensor described as plain: read back, it used to be ignored."""
    directory, _state = _state_file(tmp_path)
    path = directory / "round-1.safetensors"
    tensors, metadata = load_verified(path)
    plain = next(k for k in json.loads(metadata["order"]) if not k.endswith("::exponents"))
    tensors[plain + "::exponents"] = np.zeros(1, np.int8)
    order = [*json.loads(metadata["order"]), plain + "::exponents"]
    formats = json.loads(metadata["formats"])
    formats[plain] = json.dumps({"shape": list(tensors[plain].shape)})
    save_verified(
        path, tensors, {**metadata, "order": json.dumps(order), "formats": json.dumps(formats)}
    )
    assert read_round_state(directory, 2) is None


def test_a_zero_dim_tensor_relabelled_as_one_dim_breaks_the_digest(tmp_path: Path):
    tensors = {"step": np.asarray(3.0, dtype=np.float32)}
    save_verified(tmp_path / "f.safetensors", tensors, {})
    loaded, _ = load_verified(tmp_path / "f.safetensors")
    assert loaded["step"].shape == ()
    from lowprec_fl.task.verified_file import digest

    assert digest({"step": np.zeros(1, np.float32) + 3}, {}) != digest(tensors, {})


def test_no_held_out_split_means_no_evaluation_cap_and_the_server_starts(tmp_path: Path):
    """The paper presets set partition.test_fraction=0: the evaluation cap was 0, an error."""
    from lowprec_fl.task.data import ExampleBounds
    from strategies.factory import build_update_guard

    cfg = load_config({"overrides": "dataset=synthetic partition.test_fraction=0"})
    guard = build_update_guard(cfg, ExampleBounds(train=540, evaluate=0))
    assert guard.max_weight == 540 and guard.max_eval_weight is None
    run_config = {
        "overrides": "dataset=synthetic partition.test_fraction=0 federation.num_rounds=1 "
        "federation.num_clients=2 federation.fraction_train=1 train.max_steps=1",
        "output-dir": str(tmp_path),
    }
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    main(InProcessGrid(client_app, 2, run_config), context)
    rows = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert rows[-1]["rejected_updates"] == 0 and rows[-1]["uplink_bytes"] > 0


@pytest.mark.parametrize("connected", [2, 3, 5, 8])
def test_the_weight_cap_admits_clients_that_partition_by_the_config_or_the_federation(
    connected: int,
):
    """Clients split the data into num_clients partitions (deployment default) or into as
    many as there are SuperNodes (simulation); the largest partition is not monotone in the
    count, so the cap must admit both."""
    from server_app.app import _example_bounds

    cfg = load_config(
        {
            "overrides": "dataset=synthetic partition.scheme=dirichlet partition.alpha=0.5 "
            "federation.num_clients=6"
        }
    )
    bounds = _example_bounds(cfg, connected)
    for n in (6, connected):
        honest = max(len(client_data(cfg, i, n)[0]) for i in range(n))
        assert honest <= bounds.train


def test_a_minority_list_cannot_remove_a_metric_for_everyone():
    strategy = _strategy()
    requests = _requests(strategy)
    losses = [0.5, 0.7, [1.0], 0.9]  # one client sends a list, another length would do the same
    replies = [
        _reply(
            r,
            _content(
                _client_state(r.metadata.dst_node_id), metrics={"num-examples": 10, "loss": v}
            ),
        )
        for r, v in zip(requests, losses, strict=True)
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["loss"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)


def test_metric_names_are_bounded():
    strategy = _strategy()
    requests = _requests(strategy)
    replies = _honest(requests[:3])
    long_names = {"num-examples": 10, **{f"{i:04d}" + "x" * 20_000: 1.0 for i in range(3)}}
    replies.append(_reply(requests[3], _content(_client_state(14), metrics=long_names)))
    _, metrics = strategy.aggregate_train(1, replies)
    assert _rejected_nodes(strategy, 1) == [requests[3].metadata.dst_node_id]
    assert all(len(k) < 100 for k in metrics)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("bn.num_batches_tracked", 2**62, "integer buffer 'bn.num_batches_tracked' moved by"),
        ("bn.num_batches_tracked", -5, "integer buffer 'bn.num_batches_tracked' moved by"),
        ("bn.running_var", -50.0, "'bn.running_var' is a variance and holds negative values"),
    ],
)
def test_buffers_the_norm_does_not_bound_are_checked(name, value, reason):
    """A count may only grow by the steps a client can take; a variance is never negative
    (one entry at -50 stays within the norm bound, yet made evaluation NaN)."""
    strategy = _strategy(guard=UpdateGuard(max_weight=1000))
    requests = _requests(strategy)
    bad = _client_state(14)
    if bad[name].is_floating_point():
        bad[name] = bad[name].clone()
        bad[name][0] = value
    else:
        bad[name] = torch.tensor(value)
    replies = [*_honest(requests[:3]), _reply(requests[3], _content(bad))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert _rejected_nodes(strategy, 1) == [requests[3].metadata.dst_node_id]
    assert reason in strategy.traffic[1].rejected[0]
    expected, _ = _reference_aggregate(lambda rs: _honest(rs[:3]))
    assert _arrays_equal(arrays, expected)


def test_optimizer_state_of_another_optimizer_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Resuming an SGD run with Adam read SGD's momentum buffers and failed every round."""
    run_config = _client_run_config(f"train.state_dir={tmp_path} train.optimizer=sgd")
    client_app(_message(run_config, config={LINEAGE_KEY: LINEAGE}), _context(run_config))
    caplog.set_level(logging.WARNING)
    adam = _client_run_config(f"train.state_dir={tmp_path} train.optimizer=adam")
    reply = client_app(
        _message(adam, config={LINEAGE_KEY: LINEAGE}, server_round=2), _context(adam)
    )
    assert not reply.has_error()
    assert "keeps ['exp_avg', 'exp_avg_sq', 'step'] (state of another optimizer?)" in caplog.text


@pytest.mark.parametrize("damage", ["partial moments", "unknown tensor"])
def test_a_checkpoint_with_incomplete_strategy_state_is_refused(tmp_path: Path, damage: str):
    """FedAdam moments for part of the model passed every check, then failed in round 1."""
    path, template = _checkpoint(tmp_path)
    tensors, metadata = load_verified(path)
    strategy = json.loads(metadata["strategy"])
    if damage == "partial moments":
        drop = next(k for k in strategy["order"] if k.startswith("m_t/"))
        del tensors["strategy/" + drop]
        strategy["order"].remove(drop)
        del strategy["dtypes"][drop]
        want = "the strategy state 'm_t' covers"
    else:
        tensors["stowaway"] = np.zeros(3, np.float32)
        want = "not part of a checkpoint"
    save_verified(path, tensors, {**metadata, "strategy": json.dumps(strategy)})
    with pytest.raises(CheckpointError, match=want):
        check_fits(load_checkpoint(tmp_path), template, path)
