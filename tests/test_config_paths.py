"""Every configuration path through the real ServerApp and ClientApp, for at least two rounds.

Each case runs ``server_app.app.main`` on an in-process grid that calls the real ClientApp
(``tests/flower_harness.py``; real Messages, no serialization: the real ``flwr run`` tests
are in ``test_e2e_simulation.py``), then checks what the setting should change, observed from
outside: the uploaded formats, the clients' state, the recorded results, the final model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from safetensors.torch import load_file

import client_app.app as client_module
from client_app.app import app as client_app
from lowprec_fl.task.config import load_config
from lowprec_fl.task.data import client_data
from lowprec_fl.task.model import build_configured_model
from lowprec_fl.wire import decode_tensors, read_tensors
from quantization import BlockFloat, quantize
from scripts.task_identity import task_identity
from server_app.app import main
from server_app.checkpoint import CheckpointError
from tests.flower_harness import InProcessGrid

NODES = 3
BASE = (
    "dataset=synthetic federation.num_rounds=2 federation.num_clients=3 "
    "federation.fraction_train=1 train.max_steps=3 server.max_eval_samples=100"
)
SMALL_BN_CONVNET = "model=convnet model.width=8 model.depth=2 model.norm=batch"


@dataclass
class Run:
    """What one run left behind."""

    out: Path
    grid: InProcessGrid
    #: The content of every successful reply, by phase, as the client sent it.
    replies: dict[str, list[RecordDict]] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict]:
        return json.loads((self.out / "results.json").read_text())["rounds"]

    @property
    def config(self) -> dict:
        return json.loads((self.out / "results.json").read_text())["config"]

    @property
    def model(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "model.safetensors"))

    def formats(self, phase: str = "train") -> list[dict[str, dict]]:
        """Each reply's format record, parsed."""
        return [
            {k: json.loads(v) for k, v in r["arrays-format"].items()} for r in self.replies[phase]
        ]

    def uploads(self) -> list[dict[str, torch.Tensor]]:
        """Each training reply's model, decoded."""
        return [decode_tensors(r["arrays"], r["arrays-format"]) for r in self.replies["train"]]


def _run(out: Path, overrides: str, nodes: int = NODES, **run_config) -> Run:
    run_config = {"overrides": f"{BASE} {overrides}".strip(), "output-dir": str(out), **run_config}
    run = Run(out=out, grid=None)  # type: ignore[arg-type]

    def record(node_id: int, reply: Message) -> Message:
        if not reply.has_error():
            phase = reply.metadata.message_type.split(".")[0]
            # a copy: the strategy swaps the reply's content for the decoded one
            run.replies.setdefault(phase, []).append(RecordDict(dict(reply.content.items())))
        return reply

    run.grid = InProcessGrid(client_app, nodes, run_config, tamper=record)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with task_identity():
        main(run.grid, context)
    return run


def _assert_every_round_aggregated(run: Run, rounds: int = 2) -> None:
    rows = run.rows
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for row in rows[1:]:
        assert row["rejected_updates"] == 0 and row["failed_clients"] == 0, row
        assert row["uplink_bytes"] > 0 and math.isfinite(row["loss"]), row
    # the broadcast of round 2 is the aggregate of round 1: a model that stopped at round 1
    # would upload the same values twice (every client fails round 2)
    assert len(run.replies["train"]) == rounds * NODES


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- buffers
@pytest.mark.parametrize("quantize_buffers", [True, False])
def test_batchnorm_buffers_travel_quantized_or_in_float32(tmp_path: Path, quantize_buffers):
    run = _run(
        tmp_path,
        f"{SMALL_BN_CONVNET} quantization.quantize_buffers={str(quantize_buffers).lower()}",
    )
    _assert_every_round_aggregated(run)
    for formats in run.formats():
        running_var = formats["features.1.running_var"]
        assert ("bits" in running_var) == quantize_buffers, running_var
        assert "bits" not in formats["features.1.num_batches_tracked"]  # integers go raw
        assert "bits" in formats["features.0.weight"]
    final = run.model
    assert final["features.1.num_batches_tracked"].shape == ()
    assert int(final["features.1.num_batches_tracked"]) == 2 * 3  # 3 steps in each round
    initial = build_configured_model(load_config({"overrides": f"{BASE} {SMALL_BN_CONVNET}"}))
    assert not torch.equal(final["features.1.running_var"], initial.features[1].running_var)
    if quantize_buffers:  # the broadcast puts them back on the 8-bit grid
        var = run.uploads()[-1]["features.1.running_var"]
        assert torch.equal(var, quantize(var, BlockFloat(8, layout="block"), None))


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize(
    ("weight_layout", "wire_layout"),
    [("auto", "auto"), ("channel", "channel"), ("tensor", "tensor"), ("block", "auto")],
)
def test_weight_and_wire_layouts_reach_the_upload(tmp_path: Path, weight_layout, wire_layout):
    run = _run(
        tmp_path,
        f"quantization.weight_layout={weight_layout} quantization.wire_layout={wire_layout} "
        "quantization.block_size=16",
    )
    _assert_every_round_aggregated(run)
    wire = BlockFloat(8, layout=wire_layout, block_size=16)
    trained = BlockFloat(8, layout=weight_layout, block_size=16, rounding="nearest")
    for formats, arrays, upload in zip(
        run.formats(),
        [r["arrays"] for r in run.replies["train"]],
        run.uploads(),
        strict=True,
    ):
        for name, description in formats.items():
            shape = tuple(description["shape"])
            assert (description["layout"], description["block_size"]) == (wire_layout, 16)
            assert arrays[name + "::exponents"].numpy().size == wire.num_blocks(shape), name
            if wire_layout == weight_layout:  # lossless: the upload is the trained weights
                assert torch.equal(upload[name], quantize(upload[name], trained, None)), name


def test_a_coarser_wire_layout_rerounds_the_upload(tmp_path: Path):
    """Weights trained in 16-element blocks, sent with one exponent a tensor: valid, but the
    upload is re-rounded (a finer wire layout, e.g. tensor -> block, is lossless)."""
    layouts = "quantization.weight_layout=block quantization.block_size=16"
    lossless = _run(tmp_path / "same", f"{layouts} quantization.wire_layout=block")
    coarser = _run(tmp_path / "coarser", f"{layouts} quantization.wire_layout=tensor")
    _assert_every_round_aggregated(coarser)
    per_tensor = BlockFloat(8, layout="tensor", rounding="nearest")
    name = "classifier.weight"
    # A tensor whose 16-element blocks all share one binade is also on the per-tensor grid:
    # some uploads of the lossless run must be finer than that, every coarser one is not.
    trained = [u[name] for u in lossless.uploads()]
    assert not all(torch.equal(t, quantize(t, per_tensor, None)) for t in trained)
    for sent in coarser.uploads():
        assert torch.equal(sent[name], quantize(sent[name], per_tensor, None))  # one exponent


# ----------------------------------------------------------------------------- rounding
def test_rounding_modes_reach_the_client_and_the_optimizer(tmp_path: Path):
    finals = {}
    for rounding in ("stochastic", "nearest", "up"):
        run = _run(tmp_path / rounding, f"quantization.rounding={rounding}")
        _assert_every_round_aggregated(run)
        assert run.config["quantization"]["rounding"] == rounding
        finals[rounding] = run.model
        for formats in run.formats():
            assert {d["layout"] for d in formats.values() if "bits" in d} == {"block"}
    for a, b in [("stochastic", "nearest"), ("nearest", "up"), ("stochastic", "up")]:
        assert any(not torch.equal(finals[a][k], finals[b][k]) for k in finals[a]), (a, b)


def test_rounding_up_never_rounds_a_gradient_toward_zero(monkeypatch: pytest.MonkeyPatch):
    """`up` is a ceiling: every quantized gradient the optimizer applies is >= its float."""
    seen = []
    original = client_module.make_optimizer

    def spy(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        seen.append(optimizer.grad_fmt)
        return optimizer

    monkeypatch.setattr(client_module, "make_optimizer", spy)
    run_config = {"overrides": f"{BASE} quantization.rounding=up"}
    cfg = load_config(run_config)
    from tests.test_client_app import _context, _message

    with task_identity():
        reply = client_app(_message(run_config), _context(run_config))
    assert not reply.has_error()
    (fmt,) = seen
    assert fmt.rounding == "up" and fmt.bits == int(cfg.quantization.grad_bits)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    q = quantize(g, fmt, None)
    assert bool((q >= g).all()) and bool((q > g).any())


# ----------------------------------------------------------------------------- evaluation
def test_federated_evaluation_metrics_are_recorded_per_round(tmp_path: Path):
    run = _run(tmp_path, "federation.fraction_evaluate=1 partition.test_fraction=0.2")
    _assert_every_round_aggregated(run)
    replies = run.replies["evaluate"]
    assert len(replies) == 2 * NODES
    for row, first in zip(run.rows[1:], range(0, len(replies), NODES), strict=True):
        metrics = [replies[i]["metrics"] for i in range(first, first + NODES)]
        weights = [m["num-examples"] for m in metrics]
        for key, column in [("eval-accuracy", "eval_accuracy"), ("eval-loss", "eval_loss")]:
            expected = sum(m[key] * w for m, w in zip(metrics, weights, strict=True))
            assert row[column] == pytest.approx(expected / sum(weights), rel=1e-12), column


# ----------------------------------------------------------------------------- data shapes
@pytest.mark.parametrize("model", ["small_cnn", "convnet model.width=8 model.depth=2"])
def test_three_channel_images_train(tmp_path: Path, model: str):
    run = _run(tmp_path, f"dataset=synthetic_rgb model={model} train.max_steps=15")
    _assert_every_round_aggregated(run)
    first_conv = next(v for k, v in run.model.items() if v.dim() == 4)
    assert first_conv.shape[1] == 3
    rows = run.rows
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1, rows


# ----------------------------------------------------------------------------- training
def test_sixteen_bit_optimizer_state_is_kept_in_context_state(tmp_path: Path):
    run = _run(tmp_path, "quantization.state_format=bfp quantization.state_bits=16")
    _assert_every_round_aggregated(run)
    for context in run.grid.contexts.values():
        formats = {
            k: json.loads(v)
            for k, v in context.state.config_records["optimizer-state-format"].items()
        }
        moments = {k: d for k, d in formats.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
        assert moments and all(d["bits"] == 16 for d in moments.values()), formats
        arrays = context.state.array_records["optimizer-state"]
        assert all(arrays[k].numpy().dtype == np.int16 for k in moments)


def test_mixed_preset_trains_gradients_and_errors_at_six_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    precisions = []
    original = client_module.training_precision

    def spy(q):
        precision = original(q)
        precisions.append(precision)
        return precision

    monkeypatch.setattr(client_module, "training_precision", spy)
    run = _run(tmp_path, "quantization=mixed")
    _assert_every_round_aggregated(run)
    assert len(precisions) == 2 * NODES
    for p in precisions:
        assert (p.weight.bits, p.grad.bits, p.activation.bits, p.error.bits) == (8, 6, 8, 6)
    assert all(d["bits"] == 8 for f in run.formats() for d in f.values() if "bits" in d)


def test_local_epochs_scale_the_examples_each_client_reports(tmp_path: Path):
    run = _run(tmp_path, "train.local_epochs=2 train.max_steps=0 train.batch_size=64")
    _assert_every_round_aggregated(run)
    cfg = load_config({"overrides": BASE})
    sizes = sorted(len(client_data(cfg, i, NODES)[0]) for i in range(NODES))
    for server_round in range(2):
        replies = run.replies["train"][server_round * NODES : (server_round + 1) * NODES]
        metrics = [r["metrics"] for r in replies]
        assert sorted(m["num-examples"] for m in metrics) == [2 * n for n in sizes]
        assert sorted(m["train-steps"] for m in metrics) == [2 * -(-n // 64) for n in sizes]


@pytest.mark.parametrize("keep", [True, False])
def test_keep_optimizer_state_across_rounds(tmp_path: Path, keep: bool):
    run = _run(tmp_path, f"train.keep_optimizer_state={str(keep).lower()}")
    _assert_every_round_aggregated(run)
    for context in run.grid.contexts.values():
        assert ("optimizer-state" in context.state.array_records) == keep
    state_bytes = [r["metrics"]["optimizer-state-bytes"] for r in run.replies["train"]]
    assert all((b > 0) == keep for b in state_bytes)
    if keep:  # the step counter went on: 3 steps in each of 2 rounds
        for context in run.grid.contexts.values():
            state = read_tensors(
                context.state.array_records["optimizer-state"],
                context.state.config_records["optimizer-state-format"],
            )
            assert {int(v) for k, v in state.items() if k.endswith(".step")} == {6}


def test_keeping_optimizer_state_changes_round_two(tmp_path: Path):
    kept = _run(tmp_path / "kept", "train.keep_optimizer_state=true").model
    fresh = _run(tmp_path / "fresh", "train.keep_optimizer_state=false").model
    assert any(not torch.equal(kept[k], fresh[k]) for k in kept)


@pytest.mark.parametrize(
    ("optimizer", "state_names"),
    [("sgd", {"momentum_buffer"}), ("adamw", {"exp_avg", "exp_avg_sq", "step"})],
)
def test_sgd_and_adamw_train_on_cpu(tmp_path: Path, optimizer: str, state_names: set[str]):
    run = _run(
        tmp_path,
        f"train.optimizer={optimizer} train.lr=0.05 train.weight_decay=0.01 train.max_steps=15",
    )
    _assert_every_round_aggregated(run)
    rows = run.rows
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.1, rows
    for context in run.grid.contexts.values():
        names = {
            k.partition(".")[2].split("::")[0]
            for k in context.state.array_records["optimizer-state"]
        }
        assert names == state_names


# ----------------------------------------------------------------------------- resume
def test_resume_refuses_another_models_checkpoint(tmp_path: Path):
    _run(tmp_path, "federation.num_rounds=1")
    with pytest.raises(CheckpointError, match="holds another model's tensors"):
        _run(tmp_path, f"{SMALL_BN_CONVNET} server.resume=true")


def test_the_server_sends_no_training_settings_only_the_round_and_lineage(tmp_path):
    # The client reads lr, epochs and the rest from the run config both sides share; a train
    # message carries what only the server knows.
    sent: list[dict] = []

    def recording_client(message: Message, context: Context) -> Message:
        if message.metadata.message_type.startswith("train"):
            sent.append(dict(message.content.config_records["config"]))
        return client_app(message, context)

    run_config = {"overrides": BASE, "output-dir": str(tmp_path), "train.lr": 0.01}
    grid = InProcessGrid(recording_client, NODES, run_config)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with task_identity():
        main(grid, context)
    assert len(sent) == 2 * NODES
    assert all(set(config) == {"server-round", "lineage"} for config in sent), sent
