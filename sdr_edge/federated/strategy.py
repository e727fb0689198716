"""FedAvg / FedProx that never wait forever and keep a per-round log.

Flower's strategies wait without limit for `min_available_nodes` to be connected; a fleet
that lost a node would then hang. Here every round first waits at most `node_wait_timeout`
seconds and fails the run with a clear message otherwise, and a round in which no node
returned weights fails the run instead of silently keeping the old model. Each round's
replies, failures (with the nodes' reasons) and bytes moved are recorded for the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from sdr_edge.federated.records import arrays_nbytes

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot go on (too few nodes, every node failed a round)."""


def wait_for_nodes(grid: Grid, n: int, timeout: float, what: str) -> list[int]:
    """Node ids once at least n are connected; FederationError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() >= deadline:
            raise FederationError(f"{what}: only {len(nodes)} node(s) connected after "
                                  f"{timeout:.0f} s, {n} needed")
        if len(nodes) != last:
            log.info("%s: waiting for nodes (%d connected, %d needed)", what, len(nodes), n)
            last = len(nodes)
        time.sleep(0.5)


def reply_outcomes(sent: Iterable[Message], replies: Iterable[Message]
                   ) -> tuple[list[Message], dict[int, str]]:
    """Successful replies, and node id -> reason for every node that failed or did not answer.

    Replies are matched to nodes through the message ids the grid gave the sent messages:
    an error the SuperLink writes for an unreachable node does not carry that node's id.
    """
    node_of = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
    ok, failed, answered = [], {}, set()
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
        answered.add(node)
        if reply.has_error():
            failed[node] = str(reply.error.reason)
        else:
            ok.append(reply)
    for node in node_of.values():
        if node not in answered:
            failed[node] = "no reply before the round timeout"
    return ok, failed


@dataclass
class RoundLog:
    """What happened in one round, as the report shows it."""

    round: int
    train_ok: int = 0
    train_failed: dict[int, str] = field(default_factory=dict)
    eval_ok: int = 0
    eval_failed: dict[int, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0

    def to_dict(self) -> dict:
        return {"round": self.round, "train_ok": self.train_ok,
                "train_failed": {str(k): v for k, v in self.train_failed.items()},
                "eval_ok": self.eval_ok,
                "eval_failed": {str(k): v for k, v in self.eval_failed.items()},
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up}


class _Bounded:
    """Mixin over a Flower Message-API strategy (FedAvg and subclasses)."""

    node_wait_timeout: float = 300.0
    rounds: dict[int, RoundLog]
    _sent: dict[tuple[int, str], list[Message]]

    def _round(self, server_round: int) -> RoundLog:
        if not hasattr(self, "rounds"):
            self.rounds = {}
        return self.rounds.setdefault(server_round, RoundLog(server_round))

    def _remember(self, server_round: int, kind: str, messages: list[Message]) -> None:
        if not hasattr(self, "_sent"):
            self._sent = {}
        self._sent[(server_round, kind)] = messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        need = max(self.min_available_nodes, self.min_train_nodes)  # type: ignore[attr-defined]
        wait_for_nodes(grid, need, self.node_wait_timeout, f"round {server_round} training")
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._round(server_round).bytes_down += arrays_nbytes(arrays) * len(messages)
        self._remember(server_round, "train", messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        entry = self._round(server_round)
        ok, entry.train_failed = reply_outcomes(self._sent.pop((server_round, "train"), []),
                                                replies)
        entry.train_ok = len(ok)
        entry.bytes_up += sum(arrays_nbytes(r) for m in ok for r in m.content.array_records.values())
        if not ok:
            reasons = "; ".join(f"node {k}: {v}" for k, v in entry.train_failed.items())
            raise FederationError(f"round {server_round}: no node returned weights "
                                  f"({reasons or 'no replies before the round timeout'})")
        if len(ok) < self.min_train_nodes:  # type: ignore[attr-defined]
            log.warning("round %d: only %d node(s) trained (min-round-nodes %d)", server_round,
                        len(ok), self.min_train_nodes)  # type: ignore[attr-defined]
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        need = max(self.min_available_nodes, self.min_evaluate_nodes)  # type: ignore[attr-defined]
        wait_for_nodes(grid, need, self.node_wait_timeout, f"round {server_round} evaluation")
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self._round(server_round).bytes_down += arrays_nbytes(arrays) * len(messages)
        self._remember(server_round, "evaluate", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        entry = self._round(server_round)
        ok, entry.eval_failed = reply_outcomes(self._sent.pop((server_round, "evaluate"), []),
                                               replies)
        entry.eval_ok = len(ok)
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


class BoundedFedAvg(_Bounded, FedAvg):
    """FedAvg (McMahan et al. 2017) with bounded waits and a round log."""


class BoundedFedProx(_Bounded, FedProx):
    """FedProx (Li et al. 2020): FedAvg whose nodes add mu/2 ||w - w_global||^2 locally."""


def make_strategy(name: str, min_round_nodes: int, fraction_train: float = 1.0,
                  proximal_mu: float = 0.0, node_wait_timeout: float = 300.0) -> FedAvg:
    """The configured strategy; evaluation uses every connected node."""
    common = dict(fraction_train=fraction_train, fraction_evaluate=1.0,
                  min_train_nodes=min_round_nodes, min_evaluate_nodes=min_round_nodes,
                  min_available_nodes=min_round_nodes)
    if name == "fedprox":
        strategy: FedAvg = BoundedFedProx(proximal_mu=proximal_mu, **common)  # type: ignore[arg-type]
    elif name == "fedavg":
        strategy = BoundedFedAvg(**common)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown strategy {name!r} (fedavg or fedprox)")
    strategy.node_wait_timeout = node_wait_timeout  # type: ignore[attr-defined]
    strategy.rounds = {}  # type: ignore[attr-defined]
    strategy._sent = {}  # type: ignore[attr-defined]
    return strategy
