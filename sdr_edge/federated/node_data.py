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

A node whose data is missing, empty or unlabelled when labels are needed gets a
`NodeDataError` naming the problem; the ClientApp turns it into an error reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdr_edge.data.sources import ImageSource, load_source
from sdr_edge.errors import SdrEdgeError
from sdr_edge.federated.partition import partition, train_test_split

DEFAULT_TEST_FRACTION = 0.2


class NodeDataError(SdrEdgeError, ValueError):
    """The node's local data cannot be used (missing, empty, unreadable or unlabelled)."""


@dataclass(frozen=True)
class NodeDataConfig:
    """What `--node-config` says about the node's data."""

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
        data = node_config.get("data")
        if not isinstance(data, str) or not data.strip():
            raise NodeDataError("node config has no 'data' entry (start the SuperNode with "
                                "--node-config 'data=\"/path/to/images\"' or data=\"builtin:digits\")")
        try:
            cfg = cls(
                data=data.strip(),
                partition_id=int(node_config.get("partition-id", 0)),  # type: ignore[arg-type]
                num_partitions=int(node_config.get("num-partitions", 1)),  # type: ignore[arg-type]
                alpha=float(node_config.get("alpha", 0.0)),  # type: ignore[arg-type]
                partition_seed=int(node_config.get("partition-seed", 0)),  # type: ignore[arg-type]
                limit=_optional_int(node_config.get("limit")),
                test_fraction=float(node_config.get("test-fraction",  # type: ignore[arg-type]
                                                    DEFAULT_TEST_FRACTION)),
                kit_dir=_optional_str(node_config.get("kit-dir")),
            )
        except (TypeError, ValueError) as exc:
            raise NodeDataError(f"bad node config: {exc}") from exc
        if not 0 <= cfg.partition_id < cfg.num_partitions:
            raise NodeDataError(f"partition-id {cfg.partition_id} out of range for "
                                f"num-partitions {cfg.num_partitions}")
        return cfg


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


def _optional_int(v: object) -> int | None:
    return None if v in (None, "", 0) else int(v)  # type: ignore[arg-type]


def _optional_str(v: object) -> str | None:
    return None if v in (None, "") else str(v)


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
