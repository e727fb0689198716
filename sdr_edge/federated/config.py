"""The ServerApp's settings, read from `[tool.flwr.app.config]` (+ `flwr run --run-config`).

A pydantic model with one field per run-config key (the key is the field's alias), so every
default is written once, unknown keys are refused (a typo such as `stratgy` would otherwise
be ignored silently) and a bad value stops the run with one line naming the key before any
node is contacted, instead of failing after minutes of training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sdr_edge.errors import SdrEdgeError
from sdr_edge.routing.transferability import RERANK_METHODS
from sdr_edge.training.finetune import ROUND_LR, FineTuneConfig

_RECIPE = FineTuneConfig()  # the nodes' recipe defaults, written once in finetune

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "fedmedian", "krum",
              "multikrum", "bulyan")
ROBUST_STRATEGIES = ("fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan")
TOKEN_ENV = "SDR_REGISTRY_TOKEN"


class FederationConfigError(SdrEdgeError, ValueError):
    """A run-config value is missing or out of range."""


def _field(default: object, alias: str, **kw) -> object:
    return Field(default, alias=alias, **kw)


class FederationConfig(BaseModel):
    """Everything the ServerApp needs to route, fine-tune and save."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    num_rounds: int = _field(3, "num-server-rounds", ge=1)
    local_epochs: int = _field(3, "local-epochs", ge=1)  # measured: see docs/federation.md
    lr: float = _field(ROUND_LR, "lr", gt=0)  # a round's peak rate, defined once in finetune
    lr_schedule: Literal["cosine", "constant"] = _field("cosine", "lr-schedule")
    warmup: bool = _field(True, "warmup")  # round 1 ramps the rate up linearly
    min_lr_fraction: float = _field(0.2, "min-lr-fraction", ge=0, le=1)
    head_rounds: int = _field(0, "head-rounds", ge=0)  # first N rounds train the head only
    batch_size: int = _field(_RECIPE.batch_size, "batch-size", ge=1)
    optimizer: Literal["adamw", "sgd"] = _field(_RECIPE.optimizer, "optimizer")  # the nodes' optimiser
    backbone_lr_scale: float = _field(_RECIPE.backbone_lr_scale, "backbone-lr-scale", gt=0,
                                     le=10)
    weight_decay: float = _field(_RECIPE.weight_decay, "weight-decay", ge=0)
    fine_tune: Literal["full", "linear"] = _field("full", "fine-tune")
    bn: Literal["train", "frozen"] = _field(_RECIPE.bn, "bn")
    fedbn: bool = _field(False, "fedbn")
    probe_init: bool = _field(_RECIPE.probe_init, "probe-init")
    # FedLC tau: measured best on label-skewed fleets, a no-op on balanced ones (docs/federation.md)
    logit_adjust: float = _field(1.0, "logit-adjust", ge=0, le=2)
    strategy: str = _field("fedavg", "strategy")
    proximal_mu: float = _field(0.0, "proximal-mu", ge=0)
    server_lr: float = _field(0.01, "server-lr", gt=0)  # FedAdam / FedYogi eta, FedAvgM's rate
    server_momentum: float = _field(0.9, "server-momentum", ge=0, lt=1)  # FedAvgM
    server_tau: float = _field(1e-3, "server-tau", gt=0)  # FedAdam / FedYogi adaptivity
    trim_beta: float = _field(0.25, "trim-beta", gt=0, lt=0.5)  # FedTrimmedAvg, each end
    malicious_nodes: int = _field(1, "malicious-nodes", ge=0)  # Krum / MultiKrum / Bulyan
    run_dir: str = _field("", "run-dir")
    registry_url: str = _field("", "registry-url")
    registry_token_file: str = _field("", "registry-token-file")
    registry_pubkey: str = _field("", "registry-pubkey")
    registry_cacert: str = _field("", "registry-cacert")
    signing_key: str = _field("", "signing-key")
    out_dir: str = _field("runs/federated", "out-dir")
    min_nodes: int = _field(2, "min-nodes", ge=1)
    min_round_nodes: int = _field(2, "min-round-nodes", ge=1)
    fraction_train: float = _field(1.0, "fraction-train", gt=0, le=1)
    round_timeout: float = _field(300.0, "round-timeout", gt=0)
    node_wait_timeout: float = _field(300.0, "node-wait-timeout", gt=0)
    route: str = _field("", "route")
    # Re-rank the signature's top M on the nodes' labelled data (fleet_rerank); "": signature route
    rerank: str = _field("", "rerank")
    rerank_top_m: int = _field(8, "rerank-top-m", ge=2, le=64)
    # rerank = "consensus": "fleet" clusters the fleet's images jointly from node statistics
    # (consensus_exchange, three exchanges); "node": each node clusters its own, one exchange
    rerank_consensus: Literal["fleet", "node"] = _field("fleet", "rerank-consensus")
    seed: int = _field(0, "seed")
    evaluate_start: bool = _field(True, "evaluate-start")
    # Budget: prune the routed sub-net to this share of its MACs before FedAvg (1.0: keep it)
    prune_macs_ratio: float = _field(1.0, "prune-macs-ratio", gt=0, le=1)
    # Flower's Simulation Engine: nodes without `data` in their node config take this source,
    # split by the partition-id / num-partitions the engine gives them (node_data.sim_defaults)
    sim_data: str = _field("builtin:digits", "sim-data", min_length=1)
    sim_partition: Literal["iid", "dirichlet"] = _field("iid", "sim-partition")
    sim_alpha: float = _field(0.5, "sim-alpha", gt=0)
    sim_limit: int = _field(0, "sim-limit", ge=0)  # a seeded subset first (0: all images)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FederationConfig:
        """Validated settings; FederationConfigError naming every bad key otherwise."""
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as exc:
            raise FederationConfigError("; ".join(_describe(e) for e in exc.errors())) from None

    @field_validator("strategy", "rerank", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "fedprox" and not self.proximal_mu > 0:
            problems.append("strategy 'fedprox' needs proximal-mu > 0")
        if self.strategy == "bulyan" and self.min_round_nodes < 4 * self.malicious_nodes + 3:
            problems.append(f"strategy 'bulyan' with malicious-nodes {self.malicious_nodes} needs "
                            f"min-round-nodes >= {4 * self.malicious_nodes + 3} (4f + 3)")
        if self.rerank and self.rerank not in RERANK_METHODS:
            problems.append(f"rerank must be one of {RERANK_METHODS} or empty (the signature "
                            f"route), got {self.rerank!r}")
        if self.rerank and self.route.strip():
            problems.append("rerank picks among the signature's top routes, but route fixes the "
                            "sub-net: set one of the two")
        if self.head_rounds >= self.num_rounds and self.fine_tune == "full":
            problems.append("head-rounds must be < num-server-rounds (the rest fine-tune fully)")
        if bool(self.run_dir) == bool(self.registry_url):
            problems.append("set exactly one of run-dir (a finished sdr-server train run) and "
                            "registry-url (a running sdr-server serve)")
        if self.registry_url and not self.registry_pubkey:
            problems.append("registry-url needs registry-pubkey to verify the sub-net it serves")
        if not self.signing_key:
            problems.append("signing-key (Ed25519 private key from sdr-server keygen) is required "
                            "to sign the fine-tuned bundle")
        if problems:
            raise ValueError("; ".join(problems))
        return self

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
        """The registry token: registry-token-file, else $SDR_REGISTRY_TOKEN (one lookup rule
        for every client of the registry: sdr_edge.registry_client.resolve_token)."""
        from sdr_edge.registry_client import TokenError, resolve_token

        try:
            return resolve_token(None, self.registry_token_file or None,
                                 file_label="registry-token-file",
                                 hint=f"registry-url needs registry-token-file or ${TOKEN_ENV}")
        except TokenError as exc:
            raise FederationConfigError(str(exc)) from exc

    def train_config(self) -> dict[str, object]:
        """The local recipe every round sends (the strategy adds the round's lr and mode)."""
        return {"local-epochs": self.local_epochs, "lr": self.lr, "batch-size": self.batch_size,
                "fine-tune": self.fine_tune, "bn": self.bn, "fedbn": self.fedbn,
                "optimizer": self.optimizer, "backbone-lr-scale": self.backbone_lr_scale,
                "weight-decay": self.weight_decay,
                "probe-init": self.probe_init, "logit-adjust": self.logit_adjust,
                "proximal-mu": self.proximal_mu if self.strategy == "fedprox" else 0.0}


def _describe(error: Mapping) -> str:
    """One pydantic error as 'run config KEY: problem (got VALUE)'."""
    loc = ".".join(str(p) for p in error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        return f"run config {loc!r}: unknown key (see [tool.flwr.app.config] in pyproject.toml)"
    if not loc:  # the model validator's own problems
        return str(error.get("msg", "")).removeprefix("Value error, ")
    return f"run config {loc!r}: cannot read {error.get('input')!r} ({error.get('msg')})"
