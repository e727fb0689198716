"""Test doubles: a Flower `Grid` that delivers messages to ClientApps here; nodes that lie.

It implements the same interface the SuperLink's grid does, so `run_federation`, the
strategies and the ClientApp handlers run unchanged: the only thing missing is the network
(no serialisation, no SuperLink, no separate processes). The benchmark uses it for speed and
fast tests use it for failure cases; the end-to-end tests use the real Deployment Engine.

`LocalGrid` and `server_identity` use Flower's private `flwr.supercore` modules, hence the
one-minor-version pin of flwr in pyproject. `ByzantineApp` (below) makes some nodes lie.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1  # Flower's id for the SuperLink side of a run
ATTACKS = ("scale", "random", "nan")
ARRAYS = "arrays"


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


# Robust aggregation is only worth its cost if it holds against a bad node, so the benchmark
# and the tests need one. The attacks are the usual ones from the Byzantine-robust FL
# literature (Blanchard et al. 2017; Fang et al. 2020): the honest update scaled up, random
# weights with the honest tensors' spread, and non-finite values (which every strategy must
# refuse before averaging).
def corrupt(record: ArrayRecord, attack: str, rng: np.random.Generator,
            scale: float = 10.0) -> ArrayRecord:
    """The same keys and shapes, poisoned values."""
    out = {}
    for key, arr in record.items():
        value = np.asarray(arr.numpy())
        if value.dtype.kind != "f":
            out[key] = arr
            continue
        if attack == "scale":
            bad = value * scale
        elif attack == "random":
            bad = rng.normal(0.0, float(value.std()) + 1e-3, value.shape)
        elif attack == "nan":
            bad = value.copy()
            bad.reshape(-1)[0] = np.nan
        else:
            raise ValueError(f"unknown attack {attack!r} (one of {ATTACKS})")
        out[key] = Array(np.asarray(bad, dtype=value.dtype))
    return ArrayRecord(out)


class ByzantineApp:
    """Calls `app` like a SuperNode would; nodes whose partition-id is in `bad` poison their
    training replies with `attack`. Everything else (queries, evaluation) stays honest."""

    def __init__(self, app: Callable[[Message, Context], Message], bad: set[int],
                 attack: str = "scale", seed: int = 0) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r} (one of {ATTACKS})")
        self.app, self.bad, self.attack = app, set(bad), attack
        self.rng = np.random.default_rng(seed)

    def __call__(self, message: Message, context: Context) -> Message:
        reply = self.app(message, context)
        partition = int(context.node_config.get("partition-id", -1))  # type: ignore[arg-type]
        if (message.metadata.message_type == MessageType.TRAIN and partition in self.bad
                and not reply.has_error() and ARRAYS in reply.content.array_records):
            reply.content[ARRAYS] = corrupt(reply.content.array_records[ARRAYS], self.attack,
                                            self.rng)
        return reply
