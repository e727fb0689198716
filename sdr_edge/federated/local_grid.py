"""A Flower `Grid` that delivers messages to ClientApps in this process.

It implements the same interface the SuperLink's grid does, so `run_federation`, the
strategies and the ClientApp handlers run unchanged: the only thing missing is the network
(no serialisation, no SuperLink, no separate processes). The benchmark uses it for speed and
fast tests use it for failure cases; the end-to-end tests use the real Deployment Engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1  # Flower's id for the SuperLink side of a run


class LocalGrid(Grid):
    """Nodes 2..N+1, each a ClientApp with its own node_config, called synchronously."""

    def __init__(self, app: ClientApp, node_configs: Sequence[Mapping[str, object]],
                 run_config: Mapping[str, object] | None = None, run_id: int = 1) -> None:
        self.app = app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            SERVER_NODE_ID + 1 + i: Context(run_id, SERVER_NODE_ID + 1 + i, dict(cfg),
                                            RecordDict(), dict(run_config or {}))
            for i, cfg in enumerate(node_configs)
        }
        self.offline: set[int] = set()
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)
        self.bytes_sent = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            # Like the SuperLink's grid, give the message its id (replies point back to it).
            msg_id = f"local-{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            if node not in self.contexts or node in self.offline:
                continue  # like a node that never picks its message up: no reply
            self._replies[msg_id] = self.app(msg, self.contexts[node])
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def server_identity(run_id: int = 1) -> Iterator[None]:
    """Set the process-wide task identity a ServerApp process has (Message() reads it)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
