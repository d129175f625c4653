"""LowPrecisionMod: a plain float32 ClientApp talks to the LowPrecisionStrategy through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client_app.mod import LowPrecisionMod
from lowprec_fl.wire import decode_tensors
from quantization import BlockFloat, quantize
from tests.test_strategy import _requests, _strategy, _template

UPLINK = BlockFloat(4, layout="auto")  # what tests.test_strategy's strategy expects
DOWNLINK = BlockFloat(8, layout="auto")

pytestmark = pytest.mark.usefixtures("flower_task")


def _float32_app(step: float = 0.01, reply_arrays=None) -> ClientApp:
    """A plain Flower app that knows nothing of quantization: w <- w + step."""
    app = ClientApp(mods=[LowPrecisionMod(uplink=UPLINK, downlink=DOWNLINK)])
    seen: dict = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        seen["records"] = sorted(msg.content.keys())
        seen["dtypes"] = {k: a.numpy().dtype for k, a in arrays.items()}
        updated = {
            k: (a.numpy() + step if a.numpy().dtype.kind == "f" else a.numpy() + 1)
            for k, a in arrays.items()
        }
        chosen = reply_arrays(updated) if reply_arrays else updated
        out = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in chosen.items()})
        metrics = MetricRecord({"num-examples": 10, "train-loss": 0.5})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    app.seen = seen
    return app


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_a_float32_app_behind_the_mod_trains_with_the_low_precision_strategy():
    template = _template()
    strategy = _strategy(template, downlink=DOWNLINK)
    requests = _requests(strategy, 1, template)
    received = decode_tensors(requests[0].content["arrays"], requests[0].content["arrays-format"])
    app = _float32_app()
    replies = []
    for request in requests:
        reply = app(request, _context())
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        reply.metadata.__dict__["_src_node_id"] = request.metadata.dst_node_id
        replies.append(reply)
    # the app saw a plain Flower message: float32 arrays, no format record
    assert app.seen["records"] == ["arrays", "config"]
    assert app.seen["dtypes"]["conv.weight"] == np.float32
    upload = decode_tensors(replies[0].content["arrays"], replies[0].content["arrays-format"])
    fmt = BlockFloat(4, layout="auto", rounding="nearest")
    for name in ("conv.weight", "fc.weight"):
        assert torch.equal(upload[name], quantize(upload[name], fmt, None))  # on the 4-bit grid
        assert float((upload[name] - received[name] - 0.01).abs().max()) < 0.5
    assert upload["bn.running_var"].dtype == torch.float32  # sent in float32, returned so
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert strategy.traffic[1].rejected == [] and arrays is not None
    assert metrics["train-loss"] == 0.5


def test_a_broadcast_in_another_format_becomes_an_error_reply():
    template = _template()
    strategy = _strategy(template, downlink=BlockFloat(6, layout="auto"))
    (request, *_) = _requests(strategy, 1, template)
    reply = _float32_app()(request, _context())
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "broadcast was refused" in reply.error.reason and "6-bit" in reply.error.reason


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda a: {k: v for k, v in a.items() if k != "fc.bias"}, "missing ['fc.bias']"),
        (lambda a: {**a, "fc.bias": np.zeros(7, np.float32)}, "'fc.bias' is torch.float32 (7,)"),
        (lambda a: {**a, "fc.bias": a["fc.bias"] * np.nan}, "'fc.bias' holds NaN or inf"),
    ],
)
def test_a_reply_that_does_not_fit_the_broadcast_becomes_an_error_reply(edit, reason):
    template = _template()
    strategy = _strategy(template, downlink=DOWNLINK)
    (request, *_) = _requests(strategy, 1, template)
    reply = _float32_app(reply_arrays=edit)(request, _context())
    assert reply.has_error() and reason in reply.error.reason, reply.error.reason


def test_messages_other_than_train_and_evaluate_pass_through():
    app = ClientApp(mods=[LowPrecisionMod(uplink=UPLINK, downlink=DOWNLINK)])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": 3})}), reply_to=msg)

    message = Message(
        RecordDict({"config": ConfigRecord({"query": "partition-id"})}),
        dst_node_id=7,
        message_type="query",
    )
    message.metadata.__dict__["_message_id"] = "q1"
    reply = app(message, _context())
    assert reply.content["metrics"]["partition-id"] == 3
