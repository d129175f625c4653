"""An in-process Flower Grid: runs the real ClientApp on real Messages without Ray or sockets.

It skips network serialization, so keep at least one real ``flwr run`` test as well.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

ReplyFilter = Callable[[int, Message], Message | None]


class InProcessGrid(Grid):
    """Calls a ClientApp directly for every message; ``tamper`` may replace or drop replies.

    With ``client_errors=True`` an exception raised by the ClientApp becomes an error reply,
    as Flower's runtime does (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``); by default it
    propagates, so a broken ClientApp fails the test at once.
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        num_nodes: int,
        run_config: dict,
        tamper: ReplyFilter | None = None,
        client_errors: bool = False,
        node_ids: list[int] | None = None,
    ) -> None:
        self.client_app = client_app
        self.tamper = tamper
        self.client_errors = client_errors
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, node_id in enumerate(node_ids or range(101, 101 + num_nodes))
        }
        self._ids = itertools.count(1)

    @property
    def run(self):  # type: ignore[override]
        """Not used in-process."""
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        """Not used in-process."""

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[override]
        """Not used: strategies build Messages themselves."""
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        """All simulated nodes, by id (like Flower, not in partition order)."""
        return sorted(self.contexts)

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The nodes as the SuperLink describes them: registered in partition order, as
        Flower's simulation registers them."""
        partition = {n: c.node_config["partition-id"] for n, c in self.contexts.items()}
        return [
            NodeInfo(node_id=n, registered_at=f"2026-01-01T00:00:00.{partition[n]:06d}")
            for n in self.get_node_ids()
        ]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used in-process."""
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not used in-process."""
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message to its node's ClientApp and collect the replies."""
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            try:
                reply = self.client_app(message, self.contexts[node_id])
            except Exception as ex:
                if not self.client_errors:
                    raise
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"  # Flower's format
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
                reply = Message(error, reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = node_id
            if self.tamper is not None:
                reply = self.tamper(node_id, reply)
            if reply is not None:
                replies.append(reply)
        return replies
