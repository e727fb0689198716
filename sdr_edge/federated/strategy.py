"""Flower's strategies made safe for a fleet: bounded waits, refused updates, a round schedule.

Every strategy is Flower's own (`flwr.serverapp.strategy`): FedAvg (McMahan et al. 2017), FedAvgM (Hsu et al. 2019),
FedProx (Li et al. 2020), the adaptive server optimisers FedAdam and FedYogi (Reddi et al.
2021, "Adaptive Federated Optimization"), and the robust aggregators FedTrimmedAvg and
FedMedian (Yin et al. 2018), Krum / MultiKrum (Blanchard et al. 2017) and Bulyan (El Mhamdi
et al. 2018). `_Fleet` wraps each with what Flower leaves to the application:

* a round first waits at most `node_wait_timeout` seconds for enough connected nodes and fails
  the run with a clear message otherwise (Flower waits without limit); a round in which no node
  returned usable weights fails the run instead of silently keeping the old model;
* every update is checked before any strategy sees it: the model's keys, its shapes, finite
  values; a refused node is named in the round log and left out of the aggregate;
* the round's learning rate follows one cosine over all rounds (linear warm-up in round 1),
  and the first `head_rounds` rounds may train the head alone (LP-FT across the fleet);
* FedBN (Li et al. 2021): BatchNorm layers stay on the nodes; their updates are not averaged
  until the last round, whose weighted mean goes into the saved bundle;
* FedAdam / FedYogi / FedAvgM move BatchNorm running statistics by their plain weighted
  mean: an adaptive or momentum step on a variance can drive it negative;
* each round's replies, failures, refusals and bytes moved are recorded for the report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from sdr_edge.errors import SdrEdgeError
from sdr_edge.federated.config import FederationConfig
from sdr_edge.federated.records import arrays_nbytes

log = logging.getLogger(__name__)

ARRAYS = "arrays"


class FederationError(SdrEdgeError, RuntimeError):
    """The federation cannot go on (too few nodes, every node failed a round)."""


class RefusedUpdate(SdrEdgeError, ValueError):
    """A node's weights that no strategy may aggregate (wrong keys or shapes, NaN or inf)."""


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


def check_update(record: ArrayRecord, reference: Mapping[str, np.ndarray],
                 optional: frozenset[str] = frozenset()) -> None:
    """Refuse an update unless it holds every reference key (bar `optional`), each in the
    reference's shape, every value finite. One NaN would poison a plain average, and a wrong
    shape fails a strategy's numpy code with an error that names no node."""
    keys = set(record)
    missing = sorted(set(reference) - keys - optional)
    unexpected = sorted(keys - set(reference))
    if missing or unexpected:
        raise RefusedUpdate(f"weights do not match the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    for key in sorted(keys):
        value = record[key].numpy()
        if tuple(value.shape) != tuple(reference[key].shape):
            raise RefusedUpdate(f"weight {key!r} has shape {tuple(value.shape)}, the model's is "
                                f"{tuple(reference[key].shape)}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise RefusedUpdate(f"weight {key!r} holds NaN or inf")


@dataclass(frozen=True)
class RoundSchedule:
    """The per-round local recipe: one cosine over all rounds, warm-up in round 1.

    Round r (1-based, of R) starts at peak * f((r-1)/R) and its own cosine ends at
    peak * f(r/R), f(t) = m + (1-m)(1+cos(pi t))/2, so the rounds stitch into one decay.
    A constant rate per round and no decay (the old recipe) swung the non-IID accuracy by
    up to 13 points between rounds.
    """

    rounds: int
    peak_lr: float
    schedule: str = "cosine"
    warmup: bool = True
    min_lr_fraction: float = 0.2
    head_rounds: int = 0
    fine_tune: str = "full"

    def _f(self, t: float) -> float:
        m = self.min_lr_fraction
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    def for_round(self, r: int) -> dict[str, object]:
        """ConfigRecord entries for round r: peak lr, in-round decay, warm-up, mode."""
        if self.schedule == "constant":
            start = end = 1.0
        else:
            start, end = self._f((r - 1) / self.rounds), self._f(r / self.rounds)
        return {"lr": self.peak_lr * start, "schedule": "cosine", "min-lr-fraction": end / start,
                "warmup-fraction": 0.3 if (self.warmup and r == 1) else 0.0,
                "fine-tune": "linear" if r <= self.head_rounds else self.fine_tune,
                "send-bn": r == self.rounds}  # FedBN: the last round's BN goes to the bundle


@dataclass
class RoundLog:
    """What happened in one round, as the report shows it."""

    round: int
    train_ok: int = 0
    train_failed: dict[int, str] = field(default_factory=dict)
    train_refused: dict[int, str] = field(default_factory=dict)
    eval_ok: int = 0
    eval_failed: dict[int, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    lr: float | None = None

    def to_dict(self) -> dict:
        return {"round": self.round, "train_ok": self.train_ok,
                "train_failed": {str(k): v for k, v in self.train_failed.items()},
                "train_refused": {str(k): v for k, v in self.train_refused.items()},
                "eval_ok": self.eval_ok,
                "eval_failed": {str(k): v for k, v in self.eval_failed.items()},
                "bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "lr": self.lr}


class _Fleet:
    """Mixin over a Flower Message-API strategy (FedAvg and its subclasses)."""

    node_wait_timeout: float = 300.0
    schedule: RoundSchedule | None = None
    bn_keys: frozenset[str] = frozenset()  # BatchNorm weights + statistics
    bn_stat_keys: frozenset[str] = frozenset()  # running_mean / running_var only
    fedbn: bool = False

    def _setup(self) -> None:
        self.rounds: dict[int, RoundLog] = {}
        self._sent: dict[tuple[int, str], list[Message]] = {}
        self._global: dict[str, np.ndarray] = {}

    def _round(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog(server_round))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        need = max(self.min_available_nodes, self.min_train_nodes)  # type: ignore[attr-defined]
        wait_for_nodes(grid, need, self.node_wait_timeout, f"round {server_round} training")
        if self.schedule is not None:
            step = self.schedule.for_round(server_round)
            config = ConfigRecord({**dict(config), **step})  # type: ignore[arg-type]
            self._round(server_round).lr = float(step["lr"])  # type: ignore[arg-type]
        self._global = {k: a.numpy() for k, a in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._round(server_round).bytes_down += arrays_nbytes(arrays) * len(messages)
        self._sent[(server_round, "train")] = messages
        return messages

    def _usable(self, server_round: int, ok: list[Message]) -> list[Message]:
        """Replies whose update passes `check_update`; FedBN's are completed with the server's
        BatchNorm (a node keeps its own), so every strategy sees whole models."""
        entry, usable = self._round(server_round), []
        optional = self.bn_keys if self.fedbn else frozenset()
        for msg in ok:
            node = int(msg.metadata.src_node_id)
            try:
                if ARRAYS not in msg.content.array_records:
                    raise RefusedUpdate("the reply carries no weights")
                record = msg.content.array_records[ARRAYS]
                check_update(record, self._global, optional)
            except RefusedUpdate as exc:
                entry.train_refused[node] = str(exc)
                log.warning("round %d: update of node %d refused: %s", server_round, node, exc)
                continue
            if self.fedbn and set(record) != set(self._global):
                whole = {k: Array(v) for k, v in self._global.items()}
                whole.update(dict(record.items()))
                # same reply, metadata kept (strategies read its node id), whole model inside
                msg.content = RecordDict({**dict(msg.content.items()), ARRAYS: ArrayRecord(whole)})
            usable.append(msg)
        return usable

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        entry = self._round(server_round)
        ok, entry.train_failed = reply_outcomes(self._sent.pop((server_round, "train"), []),
                                                replies)
        entry.bytes_up += sum(arrays_nbytes(r) for m in ok for r in m.content.array_records.values())
        usable = self._usable(server_round, ok)
        entry.train_ok = len(usable)
        if not usable:
            reasons = "; ".join(f"node {k}: {v}" for k, v in
                                {**entry.train_failed, **entry.train_refused}.items())
            raise FederationError(f"round {server_round}: no node returned usable weights "
                                  f"({reasons or 'no replies before the round timeout'})")
        if len(usable) < self.min_train_nodes:  # type: ignore[attr-defined]
            log.warning("round %d: only %d node(s) trained (min-round-nodes %d)", server_round,
                        len(usable), self.min_train_nodes)  # type: ignore[attr-defined]
        arrays, metrics = super().aggregate_train(server_round, usable)  # type: ignore[misc]
        if arrays is not None and isinstance(self, FedAdam | FedYogi | FedAvgM) and self.bn_stat_keys:
            arrays = self._mean_statistics(arrays, usable)
        return arrays, metrics

    def _mean_statistics(self, arrays: ArrayRecord, usable: list[Message]) -> ArrayRecord:
        """Replace the adaptive step on BatchNorm running statistics by their weighted mean."""
        weights = np.array([float(m.content.metric_records["metrics"].get(
            self.weighted_by_key, 1)) for m in usable])  # type: ignore[attr-defined]
        weights = weights / weights.sum()
        out = dict(arrays.items())
        for key in self.bn_stat_keys & set(out):
            stacked = np.stack([m.content.array_records[ARRAYS][key].numpy() for m in usable])
            out[key] = Array(np.tensordot(weights, stacked, axes=1).astype(stacked.dtype))
        return ArrayRecord(out)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        need = max(self.min_available_nodes, self.min_evaluate_nodes)  # type: ignore[attr-defined]
        wait_for_nodes(grid, need, self.node_wait_timeout, f"round {server_round} evaluation")
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self._round(server_round).bytes_down += arrays_nbytes(arrays) * len(messages)
        self._sent[(server_round, "evaluate")] = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        entry = self._round(server_round)
        ok, entry.eval_failed = reply_outcomes(self._sent.pop((server_round, "evaluate"), []),
                                               replies)
        entry.eval_ok = len(ok)
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


class FleetFedAvg(_Fleet, FedAvg):
    """FedAvg: the num-examples weighted mean of the nodes' weights."""


class FleetFedAvgM(_Fleet, FedAvgM):
    """FedAvgM (Hsu et al. 2019): server momentum over the mean update, which carries the
    fleet's progress across rounds when label-skewed nodes pull in different directions."""


class FleetFedProx(_Fleet, FedProx):
    """FedProx: FedAvg whose nodes add mu/2 ||w - w_global||^2 to their loss."""


class FleetFedAdam(_Fleet, FedAdam):
    """FedAdam: Adam on the server over the mean update (the pseudo-gradient)."""


class FleetFedYogi(_Fleet, FedYogi):
    """FedYogi: FedAdam with Yogi's additive second-moment update (slower to grow)."""


class FleetFedTrimmedAvg(_Fleet, FedTrimmedAvg):
    """Coordinate-wise mean after dropping the `beta` largest and smallest values."""


class FleetFedMedian(_Fleet, FedMedian):
    """Coordinate-wise median of the nodes' weights."""


class FleetKrum(_Fleet, Krum):
    """Krum: the one update closest to its n - f - 2 nearest neighbours."""


class FleetMultiKrum(_Fleet, MultiKrum):
    """MultiKrum: the mean of the n - f updates with the best Krum scores."""


class FleetBulyan(_Fleet, Bulyan):
    """Bulyan: MultiKrum selection, then a trimmed mean around the median (n >= 4f + 3)."""


def make_strategy(cfg: FederationConfig, bn_keys: Iterable[str] = (),
                  bn_stat_keys: Iterable[str] = ()) -> FedAvg:
    """The run config's strategy with its round schedule; evaluation uses every node."""
    common: dict = dict(fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
                        min_train_nodes=cfg.min_round_nodes,
                        min_evaluate_nodes=cfg.min_round_nodes,
                        min_available_nodes=cfg.min_round_nodes)
    adaptive = dict(eta=cfg.server_lr, eta_l=cfg.lr, tau=cfg.server_tau)
    f = cfg.malicious_nodes
    builders = {
        "fedavg": lambda: FleetFedAvg(**common),
        "fedavgm": lambda: FleetFedAvgM(server_learning_rate=cfg.server_lr,
                                        server_momentum=cfg.server_momentum, **common),
        "fedprox": lambda: FleetFedProx(proximal_mu=cfg.proximal_mu, **common),
        "fedadam": lambda: FleetFedAdam(**adaptive, **common),
        "fedyogi": lambda: FleetFedYogi(**adaptive, **common),
        "fedtrimmedavg": lambda: FleetFedTrimmedAvg(beta=cfg.trim_beta, **common),
        "fedmedian": lambda: FleetFedMedian(**common),
        "krum": lambda: FleetKrum(num_malicious_nodes=f, **common),
        "multikrum": lambda: FleetMultiKrum(num_malicious_nodes=f,
                                            num_nodes_to_select=max(cfg.min_round_nodes - f, 1),
                                            **common),
        "bulyan": lambda: FleetBulyan(num_malicious_nodes=f, **common),
    }
    if cfg.strategy not in builders:
        raise ValueError(f"unknown strategy {cfg.strategy!r} (one of {sorted(builders)})")
    strategy = builders[cfg.strategy]()
    strategy._setup()
    strategy.node_wait_timeout = cfg.node_wait_timeout
    strategy.schedule = RoundSchedule(cfg.num_rounds, cfg.lr, cfg.lr_schedule, cfg.warmup,
                                      cfg.min_lr_fraction, cfg.head_rounds, cfg.fine_tune)
    strategy.fedbn = cfg.fedbn
    strategy.bn_keys = frozenset(bn_keys)
    strategy.bn_stat_keys = frozenset(bn_stat_keys)
    return strategy
