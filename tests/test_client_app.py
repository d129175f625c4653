"""The ClientApp on hand-built Messages, and the configuration it composes from the run config."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from omegaconf.errors import ReadonlyConfigError

from client_app.app import app as client_app
from client_app.site import client_site
from client_app.state import STATE_KEY
from lowprec_fl.federated_data import load_image_data
from lowprec_fl.federated_data.local_folder import LocalDataError
from lowprec_fl.task.config import ConfigError, load_config, resolve_device, run_config_overrides
from lowprec_fl.task.data import client_data
from lowprec_fl.task.formats import downlink_format
from lowprec_fl.task.model import build_configured_model
from lowprec_fl.task.training import evaluate_model
from lowprec_fl.wire import (
    FORMAT_SUFFIX,
    decode_tensors,
    encode_tensors,
    read_tensors,
    specs_of,
)
from quantization import BlockFloat, quantize
from quantization.codec import QuantizedTensor
from quantization.state_codec import QuantizedState
from scripts.task_identity import task_identity
from tests.shared_helpers import mnist_root, write_image_folder

BASE = "dataset=synthetic model=small_cnn train.max_steps=2 federation.num_clients=4"
NODE_ID = 201


@pytest.fixture(autouse=True)
def _identity_and_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    with task_identity():
        yield
    torch.set_num_threads(threads)  # the ClientApp sets train.threads


def _run_config(extra: str = "") -> dict:
    return {"overrides": f"{BASE} {extra}".strip()}


def _context(run_config: dict, partition_id: int | None = 0, state=None) -> Context:
    node_config = (
        {} if partition_id is None else {"partition-id": partition_id, "num-partitions": 4}
    )
    return Context(
        run_id=1,
        node_id=NODE_ID,
        node_config=node_config,
        state=RecordDict() if state is None else state,
        run_config=dict(run_config),
    )


def _global_model(run_config: dict):
    cfg = load_config(run_config)
    return cfg, {k: v.detach().clone() for k, v in build_configured_model(cfg).state_dict().items()}


def _message(
    run_config: dict,
    message_type: str = "train",
    config: dict | None = None,
    server_round: int = 1,
    state: dict | None = None,
) -> Message:
    """What the server would send: the model at the downlink format plus a config record."""
    cfg, global_state = _global_model(run_config)
    state = global_state if state is None else state
    arrays, formats = encode_tensors(
        state, downlink_format(cfg.quantization), torch.Generator().manual_seed(server_round)
    )
    values = {"server-round": server_round, **(config or {})}
    content = RecordDict(
        {"arrays": arrays, "arrays" + FORMAT_SUFFIX: formats, "config": ConfigRecord(values)}
    )
    message = Message(content, dst_node_id=NODE_ID, message_type=message_type)
    message.metadata.__dict__["_message_id"] = f"{message_type}-{server_round}"
    return message


def _received(message: Message) -> dict[str, torch.Tensor]:
    return decode_tensors(message.content["arrays"], message.content["arrays-format"])


def _uplink(reply: Message, run_config: dict) -> dict[str, torch.Tensor]:
    cfg, global_state = _global_model(run_config)
    return decode_tensors(
        reply.content["arrays"],
        reply.content["arrays-format"],
        expected=specs_of(global_state),
        bits=int(cfg.quantization.uplink_bits),
    )


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))


# ----------------------------------------------------------------------------- train
def test_train_reply_carries_quantized_weights_and_metrics():
    run_config = _run_config()
    message = _message(run_config)

    reply = client_app(message, _context(run_config))

    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    content = reply.content
    assert set(content.keys()) == {"arrays", "arrays-format", "metrics"}
    arrays, formats = content["arrays"], content["arrays-format"]
    _, global_state = _global_model(run_config)
    assert set(formats.keys()) == set(global_state)
    q = load_config(run_config).quantization
    fmt = BlockFloat(8, layout=q.weight_layout, block_size=int(q.block_size))
    for name, t in global_state.items():
        mantissas = arrays[name].numpy()
        assert mantissas.dtype == np.int8 and mantissas.size == t.numel(), name
        exponents = arrays[name + "::exponents"].numpy()
        assert exponents.dtype == np.int8, name
        assert exponents.size == fmt.num_blocks(tuple(t.shape)), name
        description = json.loads(formats[name])
        assert description == {
            "shape": list(t.shape),
            "bits": 8,
            "layout": q.weight_layout,
            "block_size": int(q.block_size),
        }, name
    metrics = content["metrics"]
    assert metrics["num-examples"] == 2 * 32  # max_steps x batch_size
    assert metrics["train-steps"] == 2
    assert math.isfinite(metrics["train-loss"]) and metrics["train-loss"] > 0
    assert metrics["payload-bytes"] == arrays.count_bytes()
    assert metrics["optimizer-state-bytes"] > 0


def _on_grid(t: torch.Tensor, fmt: BlockFloat) -> bool:
    """Whether ``t`` is exactly representable in ``fmt`` (nearest re-quantization is a no-op)."""
    nearest = BlockFloat(fmt.bits, layout=fmt.layout, rounding="nearest", block_size=fmt.block_size)
    return torch.equal(quantize(t, nearest), t)


def _uneven_global_state(run_config: dict) -> dict[str, torch.Tensor]:
    """The initial model with small weights where the two layouts' blocks disagree.

    Freshly initialised weights have about the same magnitude everywhere, so every block gets
    the same exponent and the block and auto grids coincide. Here the classifier's first 32
    inputs (whole ``block`` blocks inside one per-row ``auto`` block) and every other 3x3 kernel
    of the second conv (``auto`` blocks inside 32-element runs) are 16 times smaller: each
    layout then has elements on a finer grid than the other's.
    """
    _, state = _global_model(run_config)
    state["classifier.weight"][:, :32] /= 16
    state["features.3.weight"][:, ::2] /= 16
    return state


#: The tensor whose values the other layout cannot hold, for each configured layout.
_OFF_THE_OTHER_GRID = {"block": "classifier.weight", "auto": "features.3.weight"}


@pytest.mark.parametrize(("layout", "block_size"), [("block", 32), ("block", 16), ("auto", 32)])
def test_uplink_is_in_the_configured_layout_and_on_its_grid(layout, block_size):
    run_config = _run_config(
        f"quantization.weight_layout={layout} quantization.block_size={block_size}"
    )
    state = _uneven_global_state(run_config)
    message = _message(run_config, state=state)
    reply = client_app(message, _context(run_config))

    arrays, formats = reply.content["arrays"], reply.content["arrays-format"]
    configured = BlockFloat(8, layout=layout, block_size=block_size)
    other = BlockFloat(8, layout="auto" if layout == "block" else "block", block_size=block_size)
    for name, t in state.items():
        shape = tuple(t.shape)
        assert json.loads(formats[name]) == {
            "shape": list(shape),
            "bits": 8,
            "layout": layout,
            "block_size": block_size,
        }, name
        exponents = arrays[name + "::exponents"].numpy()
        assert exponents.size == configured.num_blocks(shape), name
    # The two layouts give these tensors different numbers of exponents: the count pins it.
    assert configured.num_blocks((10, 1568)) != other.num_blocks((10, 1568))
    assert configured.num_blocks((32, 16, 3, 3)) != other.num_blocks((32, 16, 3, 3))

    uplink = _uplink(reply, run_config)
    received = _received(message)
    for name, t in uplink.items():
        assert t.dtype == torch.float32
        assert _on_grid(t, configured), name  # already on the configured grid
        assert not torch.equal(t, received[name]), name  # it trained
    # Trained in the other layout (or re-rounded into it), this tensor would lie on its grid.
    off = _OFF_THE_OTHER_GRID[layout]
    assert not _on_grid(uplink[off], other), off
    assert not _on_grid(received[off], other), off  # the broadcast was in the configured layout


def test_train_is_deterministic():
    run_config = _run_config()
    first = client_app(_message(run_config), _context(run_config))
    second = client_app(_message(run_config), _context(run_config))
    for name in first.content["arrays"]:
        assert first.content["arrays"][name].data == second.content["arrays"][name].data, name
    for key in ("num-examples", "train-loss", "payload-bytes"):
        assert first.content["metrics"][key] == second.content["metrics"][key]


def test_different_partitions_train_differently():
    run_config = _run_config()
    a = client_app(_message(run_config), _context(run_config, partition_id=0))
    b = client_app(_message(run_config), _context(run_config, partition_id=1))
    assert _distance(_uplink(a, run_config), _uplink(b, run_config)) > 0


def _steps(state: RecordDict) -> set[float]:
    tensors = read_tensors(state[STATE_KEY], state[STATE_KEY + FORMAT_SUFFIX])
    return {float(v) for k, v in tensors.items() if k.endswith(".step")}


@pytest.mark.parametrize("state_bits", [8, 32, "lowbit-8", "lowbit-4"])
def test_optimizer_state_is_kept_between_rounds(state_bits):
    state_format = "bfp"
    if isinstance(state_bits, str):
        state_format, state_bits = state_bits.split("-")[0], int(state_bits.split("-")[1])
    overrides = (
        f"train.keep_optimizer_state=true quantization.state_bits={state_bits} "
        f"quantization.state_format={state_format}"
    )
    run_config = _run_config(overrides)
    context = _context(run_config)

    client_app(_message(run_config, server_round=1), context)
    assert STATE_KEY in context.state.array_records
    assert _steps(context.state) == {2.0}
    stored = read_tensors(context.state[STATE_KEY], context.state[STATE_KEY + FORMAT_SUFFIX])
    moments = [v for k, v in stored.items() if k.endswith(("exp_avg", "exp_avg_sq"))]
    if state_format == "lowbit":  # kept as code-map indices and scales
        assert moments and all(
            isinstance(v, QuantizedState) and v.fmt.bits == state_bits for v in moments
        )
    elif state_bits == 8:  # kept as BFP codes
        assert moments and all(isinstance(v, QuantizedTensor) and v.fmt.bits == 8 for v in moments)
    else:  # kept as float32 tensors (the default)
        assert moments and all(v.dtype == torch.float32 for v in moments)

    second = client_app(_message(run_config, server_round=2), context)
    assert _steps(context.state) == {4.0}  # Adam's step counter continued
    assert second.content["metrics"]["optimizer-state-bytes"] > 0

    # The state changes the update: the same round-2 message on a fresh node differs.
    fresh = client_app(_message(run_config, server_round=2), _context(run_config))
    assert _distance(_uplink(second, run_config), _uplink(fresh, run_config)) > 0


@pytest.mark.parametrize(
    "state",
    [
        "",
        "quantization.state_bits=4",
        "quantization.state_format=bfp",
        "quantization.state_bits=32",
    ],
    ids=["lowbit8-default", "lowbit4", "bfp8", "fp32"],
)
def test_optimizer_state_survives_a_new_run_through_the_state_dir(tmp_path, state):
    run_config = {
        **_run_config(f"train.keep_optimizer_state=true {state}"),
        "train.state_dir": str(tmp_path),
    }
    context = _context(run_config)
    client_app(_message(run_config, server_round=1), context)
    kept = client_app(_message(run_config, server_round=2), context)
    files = sorted(p.name for p in (tmp_path / "partition-0").iterdir())
    assert files == ["round-1.safetensors", "round-2.safetensors"]

    # A resumed run redoes round 2 with a fresh context: the round-1 file stands in for it.
    resumed = client_app(_message(run_config, server_round=2), _context(run_config))
    for name in kept.content["arrays"]:
        assert kept.content["arrays"][name].data == resumed.content["arrays"][name].data, name


def test_optimizer_state_not_stored_when_disabled():
    run_config = _run_config("train.keep_optimizer_state=false")
    context = _context(run_config)
    for server_round in (1, 2):
        reply = client_app(_message(run_config, server_round=server_round), context)
        assert reply.content["metrics"]["optimizer-state-bytes"] == 0
    assert len(context.state) == 0
    # Without kept state every round starts from scratch: same as a fresh node.
    fresh = client_app(_message(run_config, server_round=2), _context(run_config))
    assert reply.content["arrays"]["classifier.weight"].data == (
        fresh.content["arrays"]["classifier.weight"].data
    )


def test_proximal_term_keeps_the_update_closer_to_the_global_model():
    run_config = _run_config("train.max_steps=5")
    distances = {}
    for mu in (0.0, 1.0):
        message = _message(run_config, config={"proximal-mu": mu})
        reply = client_app(message, _context(run_config))
        distances[mu] = _distance(_uplink(reply, run_config), _received(message))
    assert 0 < distances[1.0] < 0.9 * distances[0.0], distances

    # No proximal-mu in the config is the same as mu = 0 (same seed, same update).
    plain = client_app(_message(run_config), _context(run_config))
    assert (
        _distance(_uplink(plain, run_config), _received(_message(run_config))) == (distances[0.0])
    )


def test_client_rejects_a_broadcast_in_the_wrong_format():
    run_config = _run_config()
    message = _message(run_config)
    _, global_state = _global_model(run_config)
    arrays, formats = encode_tensors(global_state, BlockFloat(4, layout="auto"))
    message.content = RecordDict(
        {"arrays": arrays, "arrays-format": formats, "config": message.content["config"]}
    )
    reply = client_app(message, _context(run_config))
    assert reply.has_error()
    assert "4-bit mantissas; accepted widths: [8]" in reply.error.reason, reply.error.reason


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_reports_loss_and_accuracy_on_the_local_held_out_split():
    run_config = _run_config()
    message = _message(run_config, message_type="evaluate")

    reply = client_app(message, _context(run_config, partition_id=1))

    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {"num-examples", "eval-loss", "eval-accuracy"}
    assert set(reply.content.keys()) == {"metrics"}
    cfg = load_config(run_config)
    _, held_out = client_data(cfg, 1, 4)
    assert metrics["num-examples"] == len(held_out) > 0
    model = build_configured_model(cfg)
    model.load_state_dict(_received(message))
    loss, accuracy = evaluate_model(
        model, held_out, cfg.server.eval_batch_size, resolve_device(cfg)
    )
    assert metrics["eval-loss"] == pytest.approx(loss)
    assert metrics["eval-accuracy"] == pytest.approx(accuracy)
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0 and math.isfinite(metrics["eval-loss"])


# ----------------------------------------------------------------------------- node config
@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_node_without_partition_id_gets_a_clear_error(message_type):
    run_config = _run_config()
    message = _message(run_config, message_type=message_type)
    with pytest.raises(ValueError, match="--node-config") as err:
        client_app(message, _context(run_config, partition_id=None))
    assert "partition-id" in str(err.value) and "data-dir" in str(err.value)


def _device_context(run_config: dict, folder, partition_id: int | None = None) -> Context:
    context = _context(run_config, partition_id=None)
    context.node_config["data-dir"] = str(folder)
    if partition_id is not None:
        context.node_config["partition-id"] = partition_id
    return context


def test_a_device_trains_on_all_of_its_own_images(tmp_path):
    mnist = load_image_data("mnist", mnist_root(), train=True)
    folder = write_image_folder(mnist, (2, 5), 30, tmp_path / "images")
    run_config = {"overrides": "model=small_cnn train.max_steps=0 partition.test_fraction=0.1"}
    reply = client_app(_message(run_config), _device_context(run_config, folder))
    assert reply.content["metrics"]["num-examples"] == 54  # 60 images, 6 held out
    evaluated = client_app(
        _message(run_config, message_type="evaluate"), _device_context(run_config, folder)
    )
    assert evaluated.content["metrics"]["num-examples"] == 6


def test_a_device_is_keyed_by_its_node_id_unless_it_has_a_partition_id(tmp_path):
    cfg = load_config({"overrides": "dataset=mnist"})
    site = client_site(cfg, _device_context({}, tmp_path))
    assert (site.party, site.name, site.data_dir) == (NODE_ID, f"node-{NODE_ID}", str(tmp_path))
    site = client_site(cfg, _device_context({}, tmp_path, partition_id=3))
    assert (site.party, site.name) == (3, "partition-3")
    context = _device_context({}, "")
    with pytest.raises(ValueError, match="data-dir is empty"):
        client_site(cfg, context)


def test_a_device_with_a_broken_folder_gets_a_clear_error(tmp_path):
    (tmp_path / "cats").mkdir()
    run_config = {"overrides": "model=small_cnn"}
    with pytest.raises(LocalDataError, match=r"not class indices 0..9 of MNIST"):
        client_app(_message(run_config), _device_context(run_config, tmp_path))


def test_partition_id_out_of_range_gets_a_clear_error():
    run_config = _run_config()
    context = _context(run_config)
    context.node_config["partition-id"] = 4  # of 4 partitions: 0..3
    with pytest.raises(ValueError, match=r"partition-id 4 is outside 0\.\.3.*--node-config"):
        client_app(_message(run_config), context)


# ----------------------------------------------------------------------------- configuration
def test_config_errors_list_every_bad_key():
    with pytest.raises(ConfigError) as err:
        load_config({"overrides": "dataset=synthetic federation.num_rounds=0 quantization.bits=1"})
    text = str(err.value)
    assert "federation.num_rounds=0: must be >= 1" in text
    for key in ("weight_bits", "grad_bits", "uplink_bits", "downlink_bits"):
        assert f"quantization.{key}=1: bits=1 is not supported" in text


def test_config_errors_for_several_groups():
    overrides = (
        "dataset=synthetic train.lr=0 server.moving_average=1.0 partition.alpha=-1 "
        "server.weighting=median train.optimizer=rmsprop"
    )
    with pytest.raises(ConfigError) as err:
        load_config({"overrides": overrides})
    text = str(err.value)
    for key in (
        "train.lr=0",
        "server.moving_average=1.0",
        "partition.alpha=-1",
        "server.weighting='median'",
        "train.optimizer='rmsprop'",
    ):
        assert key in text, key


def test_unknown_group_option_is_a_config_error():
    with pytest.raises(ConfigError, match="strategy/fedfoo") as err:
        load_config({"overrides": "strategy=fedfoo"})
    assert "fedavg" in str(err.value)  # lists the available options


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match="nosuchkey"):
        load_config({"overrides": "nosuchkey=3"})


@pytest.mark.parametrize("key", ["output_dir", "train.state_dir"])
def test_relative_directory_is_a_config_error(key):
    with pytest.raises(ConfigError, match=f"{key}='relative/x': must be an absolute path"):
        load_config({key: "relative/x"})


def test_run_config_overrides_mapping():
    run_config = {
        "overrides": "a=1 b=2",
        "output-dir": "/x",
        "federation.num_rounds": 3,
        "seed": "",
    }
    assert run_config_overrides(run_config) == [
        "a=1",
        "b=2",
        "output_dir=/x",
        "federation.num_rounds=3",
    ]
    assert run_config_overrides({"train.keep_optimizer_state": False, "x": None}) == [
        "train.keep_optimizer_state=false"
    ]
    assert run_config_overrides({}) == []


def test_run_config_keys_reach_the_config():
    cfg = load_config(
        {
            "overrides": "dataset=synthetic quantization=bfp4",
            "federation.num_rounds": 3,
            "train.keep_optimizer_state": False,
            "output-dir": "/tmp/lowprec out",
            "seed": "",
        }
    )
    assert cfg.quantization.uplink_bits == 4 and cfg.quantization.downlink_bits == 4
    assert cfg.federation.num_rounds == 3
    assert cfg.train.keep_optimizer_state is False
    assert cfg.output_dir == "/tmp/lowprec out"
    assert cfg.seed == 0


@pytest.mark.parametrize("path", ["/runs/bits=4", "/runs/a,b", "/runs/run (1)"])
def test_output_dir_with_hydra_special_characters(path):
    assert load_config({"output-dir": path}).output_dir == path


def test_quoted_value_in_free_form_overrides():
    cfg = load_config({"overrides": "dataset=synthetic output_dir='/runs/a,b'"})
    assert cfg.output_dir == "/runs/a,b"


def test_loaded_config_is_read_only_and_independent():
    first = load_config({"overrides": "dataset=synthetic"})
    with pytest.raises(ReadonlyConfigError):
        first.seed = 5
    second = load_config({"overrides": "dataset=synthetic"})
    assert second.seed == 0
