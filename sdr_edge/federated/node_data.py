"""A SuperNode's local data, described by its `--node-config`.

Keys (all optional except `data`):

    data            a folder of images (class sub-folders give labels), `builtin:digits`,
                    `fashion-mnist[:train|:test]`
    partition-id    which partition this node holds (default 0)
    num-partitions  how many nodes share the source (default 1: the node keeps all of it)
    alpha           Dirichlet concentration for a label-skewed split; 0 or absent: IID
    partition-seed  seed shared by all nodes so partitions are disjoint (default 0)
    limit           keep a seeded subset of the source first (large built-in sets)
    test-fraction   share of the node's images held out for `evaluate` (default 0.2)
    kit-dir         the signature kit (RUN_DIR/kit or the one fetched from the registry)
    dp-epsilon      release a differentially private signature (sdr_edge.routing.privacy)
    bundle-dir      keep the signed fine-tuned bundle here; server-pubkey verifies it

Flower's Simulation Engine gives its virtual nodes only `partition-id` and `num-partitions`;
`with_simulation_defaults` fills in the rest from the run config (`sim-*` keys, the run's kit).

Any other key is refused (NodeConfig). A node whose data is missing, empty or unlabelled when labels are needed gets a
`NodeDataError` naming the problem; the ClientApp turns it into an error reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sdr_edge.data.sources import ImageSource, load_source
from sdr_edge.errors import SdrEdgeError
from sdr_edge.federated.partition import partition, train_test_split

DEFAULT_TEST_FRACTION = 0.2


class NodeDataError(SdrEdgeError, ValueError):
    """The node's local data cannot be used (missing, empty, unreadable or unlabelled)."""


class NodeConfig(BaseModel):
    """Every key a SuperNode's `--node-config` may hold (unknown keys are refused: a typo such
    as `kit_dir` would otherwise surface only as a missing kit, rounds later)."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # aliases only: kit_dir is a typo

    data: str = Field(min_length=1)
    partition_id: int = Field(0, alias="partition-id", ge=0)
    num_partitions: int = Field(1, alias="num-partitions", ge=1)
    alpha: float = Field(0.0, alias="alpha", ge=0)
    partition_seed: int = Field(0, alias="partition-seed")
    limit: int | None = Field(None, alias="limit", ge=0)
    test_fraction: float = Field(DEFAULT_TEST_FRACTION, alias="test-fraction", gt=0, lt=1)
    kit_dir: str | None = Field(None, alias="kit-dir")
    dp_epsilon: float | None = Field(None, alias="dp-epsilon", ge=0)
    bundle_dir: str | None = Field(None, alias="bundle-dir")
    server_pubkey: str | None = Field(None, alias="server-pubkey")

    @field_validator("data", mode="before")
    @classmethod
    def _strip(cls, value: object) -> object:
        return value.strip() if isinstance(value, str) else value

    @field_validator("limit", "kit_dir", "dp_epsilon", "bundle_dir", "server_pubkey",
                     mode="before")
    @classmethod
    def _unset(cls, value: object) -> object:
        return None if value in ("", 0) else value  # Flower's node config has no null

    @model_validator(mode="after")
    def _in_range(self) -> NodeConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(f"partition-id {self.partition_id} out of range for "
                             f"num-partitions {self.num_partitions}")
        return self

    @classmethod
    def parse(cls, node_config: Mapping[str, object]) -> NodeConfig:
        """Validated node config; NodeDataError naming each bad key otherwise."""
        if not str(node_config.get("data") or "").strip():
            raise NodeDataError("node config has no 'data' entry (start the SuperNode with "
                                "--node-config 'data=\"/path/to/images\"' or data=\"builtin:digits\")")
        try:
            return cls.model_validate(dict(node_config))
        except ValidationError as exc:
            raise NodeDataError("bad node config: " + "; ".join(
                _describe(e) for e in exc.errors())) from None


SIM_PARTITION_KEYS = frozenset({"partition-id", "num-partitions"})


def with_simulation_defaults(node_config: Mapping[str, object],
                             run_config: Mapping[str, object]) -> dict[str, object]:
    """A simulated node's config: what the engine gave it plus data and kit from the run.

    Flower's Simulation Engine puts only `partition-id` / `num-partitions` into a virtual
    node's config. Such a node (and only such: a SuperNode started with a node config keeps
    it as it is, so a device missing its data is still told so) takes the run config's
    `sim-data` split IID or Dirichlet(`sim-alpha`) by `sim-partition`, a `sim-limit` subset,
    the run's `seed` as partition seed (the same on every node: disjoint shares), and the
    signature kit of `run-dir` (the simulation runs on the server's machine).
    """
    config = dict(node_config)
    if "data" in config or not set(config) <= SIM_PARTITION_KEYS or not config:
        return config
    config["data"] = str(run_config.get("sim-data") or "builtin:digits")
    if str(run_config.get("sim-partition", "iid")).lower() == "dirichlet":
        config["alpha"] = float(run_config.get("sim-alpha", 0.5))  # type: ignore[arg-type]
    if int(run_config.get("sim-limit", 0) or 0) > 0:  # type: ignore[arg-type]
        config["limit"] = int(run_config["sim-limit"])  # type: ignore[arg-type]
    config["partition-seed"] = int(run_config.get("seed", 0) or 0)  # type: ignore[arg-type]
    if run_config.get("run-dir"):
        config["kit-dir"] = str(Path(str(run_config["run-dir"])).expanduser() / "kit")
    return config


def _describe(error: Mapping) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        return f"unknown key {loc!r}"
    if not loc:
        return str(error.get("msg", "")).removeprefix("Value error, ")
    return f"{loc!r}: {error.get('msg')} (got {error.get('input')!r})"


@dataclass(frozen=True)
class NodeDataConfig:
    """What the node config says about the node's data (hashable: the data cache's key)."""

    data: str
    partition_id: int = 0
    num_partitions: int = 1
    alpha: float = 0.0
    partition_seed: int = 0
    limit: int | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    kit_dir: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodeDataConfig:
        c = NodeConfig.parse(node_config)
        return cls(c.data, c.partition_id, c.num_partitions, c.alpha, c.partition_seed,
                   c.limit, c.test_fraction, c.kit_dir)


@dataclass
class NodeData:
    """The node's images split into a training part and a held-out part."""

    train: ImageSource
    test: ImageSource
    skipped: list[str]

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.train, self.test)

    def all_images(self) -> np.ndarray:
        return np.concatenate([self.train.images, self.test.images])


def num_classes_of(*sources: ImageSource) -> int:
    """Number of classes the sources' label space holds (names when known, else max + 1)."""
    for s in sources:
        if s.label_names:
            return len(s.label_names)
    top = [int(s.labels.max()) for s in sources if s.labels is not None and len(s)]
    return max(top) + 1 if top else 0


def load_partition(cfg: NodeDataConfig, image_size: int, channels: int) -> ImageSource:
    """The node's share of its data source at image_size x image_size x channels."""
    if not cfg.data.startswith(("builtin:", "fashion-mnist")) and not Path(cfg.data).exists():
        raise NodeDataError(f"local data folder {cfg.data!r} does not exist")
    try:
        source = load_source(cfg.data, image_size, channels, limit=cfg.limit,
                             seed=cfg.partition_seed)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise NodeDataError(f"cannot read local data {cfg.data!r}: {exc}") from exc
    if len(source) == 0:
        skipped = f" ({len(source.skipped)} unreadable files skipped)" if source.skipped else ""
        raise NodeDataError(f"local data {cfg.data!r} holds no readable images{skipped}")
    if cfg.num_partitions > 1:
        try:
            parts = partition(source.labels, len(source), cfg.num_partitions,
                              cfg.alpha if cfg.alpha > 0 else None, cfg.partition_seed)
        except ValueError as exc:
            raise NodeDataError(f"cannot partition {cfg.data!r}: {exc}") from exc
        skipped = source.skipped
        source = source.subset(parts[cfg.partition_id],
                               f"{cfg.data}[{cfg.partition_id}/{cfg.num_partitions}]")
        source.skipped = skipped
    return source


def load_node_data(cfg: NodeDataConfig, image_size: int, channels: int,
                   need_labels: bool = True) -> NodeData:
    """Load, partition and split the node's data; refuse clearly what cannot be trained on."""
    source = load_partition(cfg, image_size, channels)
    if need_labels and source.labels is None:
        raise NodeDataError(f"local data {cfg.data!r} has no labels: fine-tuning needs the "
                            "images in one sub-folder per class")
    try:
        train_idx, test_idx = train_test_split(len(source), cfg.test_fraction,
                                               seed=cfg.partition_seed + cfg.partition_id)
    except ValueError as exc:
        raise NodeDataError(f"local data {cfg.data!r}: {exc}") from exc
    return NodeData(source.subset(train_idx, f"{source.name}:train"),
                    source.subset(test_idx, f"{source.name}:test"), list(source.skipped))
