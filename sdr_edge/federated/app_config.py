"""The ServerApp's settings, read from `[tool.flwr.app.config]` (+ `flwr run --run-config`).

Every key is validated up front, so a bad value stops the run with one clear line before any
node is contacted, instead of failing after minutes of training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sdr_edge.training.finetune import ROUND_LR

STRATEGIES = ("fedavg", "fedprox")
TOKEN_ENV = "SDR_REGISTRY_TOKEN"


class FederationConfigError(ValueError):
    """A run-config value is missing or out of range."""


def _bool(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise FederationConfigError(f"run config {key!r}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class FederationConfig:
    """Everything the ServerApp needs to route, fine-tune and save."""

    num_rounds: int = 3
    local_epochs: int = 1
    lr: float = ROUND_LR  # a round's peak rate (sdr_edge.training.finetune), defined once
    batch_size: int = 32
    fine_tune: str = "full"
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    run_dir: str = ""
    registry_url: str = ""
    registry_token_file: str = ""
    registry_pubkey: str = ""
    registry_cacert: str = ""
    signing_key: str = ""
    out_dir: str = "runs/federated"
    min_nodes: int = 2
    min_round_nodes: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 300.0
    node_wait_timeout: float = 300.0
    route: str = ""
    seed: int = 0
    evaluate_start: bool = True

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FederationConfig:
        def get(key: str, kind: type, default: object) -> object:
            value = run_config.get(key, default)
            try:
                return kind(value)
            except (TypeError, ValueError) as exc:
                raise FederationConfigError(f"run config {key!r}: cannot read {value!r} as "
                                            f"{kind.__name__}") from exc

        cfg = cls(
            num_rounds=get("num-server-rounds", int, 3),  # type: ignore[arg-type]
            local_epochs=get("local-epochs", int, 1),  # type: ignore[arg-type]
            lr=get("lr", float, ROUND_LR),  # type: ignore[arg-type]
            batch_size=get("batch-size", int, 32),  # type: ignore[arg-type]
            fine_tune=str(run_config.get("fine-tune", "full")),
            strategy=str(run_config.get("strategy", "fedavg")).lower(),
            proximal_mu=get("proximal-mu", float, 0.0),  # type: ignore[arg-type]
            run_dir=str(run_config.get("run-dir", "")),
            registry_url=str(run_config.get("registry-url", "")),
            registry_token_file=str(run_config.get("registry-token-file", "")),
            registry_pubkey=str(run_config.get("registry-pubkey", "")),
            registry_cacert=str(run_config.get("registry-cacert", "")),
            signing_key=str(run_config.get("signing-key", "")),
            out_dir=str(run_config.get("out-dir", "runs/federated")),
            min_nodes=get("min-nodes", int, 2),  # type: ignore[arg-type]
            min_round_nodes=get("min-round-nodes", int, 2),  # type: ignore[arg-type]
            fraction_train=get("fraction-train", float, 1.0),  # type: ignore[arg-type]
            round_timeout=get("round-timeout", float, 300.0),  # type: ignore[arg-type]
            node_wait_timeout=get("node-wait-timeout", float, 300.0),  # type: ignore[arg-type]
            route=str(run_config.get("route", "")),
            seed=get("seed", int, 0),  # type: ignore[arg-type]
            evaluate_start=_bool(run_config.get("evaluate-start", True), "evaluate-start"),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        if self.num_rounds < 1:
            problems.append("num-server-rounds must be >= 1")
        if self.local_epochs < 1 or self.batch_size < 1:
            problems.append("local-epochs and batch-size must be >= 1")
        if not self.lr > 0:
            problems.append("lr must be > 0")
        if self.fine_tune not in ("full", "linear"):
            problems.append(f"fine-tune must be 'full' or 'linear', got {self.fine_tune!r}")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "fedprox" and not self.proximal_mu > 0:
            problems.append("strategy 'fedprox' needs proximal-mu > 0")
        if self.min_nodes < 1 or self.min_round_nodes < 1:
            problems.append("min-nodes and min-round-nodes must be >= 1")
        if not 0 < self.fraction_train <= 1:
            problems.append("fraction-train must be in (0, 1]")
        if not self.round_timeout > 0 or not self.node_wait_timeout > 0:
            problems.append("round-timeout and node-wait-timeout must be > 0")
        if bool(self.run_dir) == bool(self.registry_url):
            problems.append("set exactly one of run-dir (a finished sdr-server train run) and "
                            "registry-url (a running sdr-server serve)")
        if self.registry_url and not self.registry_pubkey:
            problems.append("registry-url needs registry-pubkey to verify the sub-net it serves")
        if not self.signing_key:
            problems.append("signing-key (Ed25519 private key from sdr-server keygen) is required "
                            "to sign the fine-tuned bundle")
        if problems:
            raise FederationConfigError("; ".join(problems))

    def fixed_route(self) -> tuple[int, ...] | None:
        """A route given in the config ('1,0,2,3' or '1-0-2-3'), bypassing signature routing."""
        from sdr_edge.routing.route_ids import RouteIdError, parse_route_id

        text = self.route.strip()
        if not text:
            return None
        try:  # the library's strict parser: plain ASCII digits, fullmatched
            return parse_route_id(text, separators="-,")
        except RouteIdError as exc:
            raise FederationConfigError(f"route {self.route!r} is not digits like 1,0,2,3") \
                from exc

    def registry_token(self) -> str:
        if self.registry_token_file:
            path = Path(self.registry_token_file).expanduser()
            if not path.is_file():
                raise FederationConfigError(f"registry-token-file {path} does not exist")
            return path.read_text(encoding="utf-8").strip()
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            raise FederationConfigError(f"registry-url needs registry-token-file or ${TOKEN_ENV}")
        return token

    def train_config(self) -> dict[str, object]:
        """The per-round local recipe sent to every node."""
        return {"local-epochs": self.local_epochs, "lr": self.lr, "batch-size": self.batch_size,
                "fine-tune": self.fine_tune}
