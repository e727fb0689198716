"""The training config: TOML tables parsed into frozen dataclasses, validated with clear errors.

Every table and key has a default, so a config file only says what differs. Unknown tables or
keys are errors (a typo must not silently train with a default). The resolved config is written
to RUN_DIR/config.toml, which makes a run directory self-describing and lets a rerun detect
that it would resume a different run.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from sdr_edge.data.augment import AugmentConfig
from sdr_edge.models.resnet import BackboneConfig
from sdr_edge.models.sdrnet import default_level_stages


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the table and key."""


@dataclass(frozen=True)
class DataConfig:
    """Which images and at what size; `val_fraction` is held out for the kNN monitor."""

    source: str = ""
    image_size: int = 28
    channels: int = 1
    limit: int | None = None
    val_fraction: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    """A backbone preset with optional overrides of its shape."""

    preset: str = "small"
    widths: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None
    stem_width: int | None = None


@dataclass(frozen=True)
class RoutingConfig:
    """Experts per level (K = product) and which stage serves each level."""

    branching: tuple[int, ...] = (4, 4, 4, 4)
    level_stages: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SSLConfig:
    """SimSiam heads and optimiser; `batch_size` is global (split across DDP ranks)."""

    proj_dim: int = 256
    pred_hidden: int = 64
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    kd_weight: float = 0.5


@dataclass(frozen=True)
class ScheduleConfig:
    """Epochs of phase 0 (unified SimSiam) and of each progressive routing level."""

    phase0_epochs: int = 10
    level_epochs: tuple[int, ...] = (2, 2, 2, 2)


@dataclass(frozen=True)
class ClusterConfig:
    """Residual k-means backend ('auto', 'faiss' or 'sklearn'), iterations, and how many
    points fit each level's centroids (None: all; every point is still assigned)."""

    backend: str = "auto"
    iters: int = 25
    sample: int | None = None


@dataclass(frozen=True)
class KitConfig:
    """Epochs of the signature kit's distillation."""

    epochs: int = 5


@dataclass(frozen=True)
class AugmentSection:
    """SimSiam view strengths: crop area range, horizontal flips (off for digits or text),
    brightness/contrast jitter and the chance of a blur."""

    crop_min: float = 0.3
    crop_max: float = 1.0
    flip: bool = True
    jitter: float = 0.4
    blur_p: float = 0.5

    def to_augment_config(self) -> AugmentConfig:
        return AugmentConfig(crop_scale=(self.crop_min, self.crop_max), flip=self.flip,
                             brightness=self.jitter, contrast=self.jitter, blur_p=self.blur_p)


@dataclass(frozen=True)
class TrainSection:
    """Seed, device, CPU threads, and how often the kNN monitor runs (0: never).

    `threads` sets torch's intra-op threads (0 keeps torch's default). Small models on a shared
    CPU run far faster with 1: OpenMP threads spin-wait on each other when the cores are busy.
    `amp` runs forward passes under bfloat16 autocast on CUDA (ignored on CPU).
    """

    seed: int = 0
    device: str = "auto"
    threads: int = 0
    amp: bool = False
    knn_every: int = 1
    knn_max: int = 20000


@dataclass(frozen=True)
class TrainConfig:
    """The whole resolved config of one `sdr-server train` run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    kit: KitConfig = field(default_factory=KitConfig)
    train: TrainSection = field(default_factory=TrainSection)
    augment: AugmentSection = field(default_factory=AugmentSection)

    def backbone_config(self) -> BackboneConfig:
        overrides = {k: v for k, v in (("widths", self.model.widths), ("blocks", self.model.blocks),
                                       ("stem_width", self.model.stem_width)) if v is not None}
        try:
            return BackboneConfig.preset(self.model.preset, in_channels=self.data.channels,
                                         **overrides)
        except ValueError as exc:
            raise ConfigError(f"[model]: {exc}") from None

    def resolved_level_stages(self) -> tuple[int, ...]:
        if self.routing.level_stages is not None:
            return self.routing.level_stages
        return default_level_stages(self.backbone_config().num_stages, len(self.routing.branching))

    @property
    def num_subnets(self) -> int:
        k = 1
        for b in self.routing.branching:
            k *= b
        return k

    @property
    def total_epochs(self) -> int:
        return self.schedule.phase0_epochs + sum(self.schedule.level_epochs)

    def to_dict(self) -> dict[str, Any]:
        """TOML-ready dict (None values dropped: TOML has no null)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            table = dataclasses.asdict(getattr(self, f.name))
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in table.items() if v is not None}
        return out


_TABLE_TYPES = {
    "data": DataConfig, "model": ModelConfig, "routing": RoutingConfig, "ssl": SSLConfig,
    "schedule": ScheduleConfig, "cluster": ClusterConfig, "kit": KitConfig, "train": TrainSection,
    "augment": AugmentSection,
}  # fmt: skip


def _coerce(table: str, key: str, value: Any, annotation: str) -> Any:
    """Check one value against its field's type, naming `[table] key` when it is wrong."""
    where = f"[{table}] {key}"
    if "tuple" in annotation:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in value):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        return tuple(value)
    if "float" in annotation:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if "int" in annotation:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if "str" in annotation:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from parsed TOML."""
    tables = {}
    for name, value in raw.items():
        if name not in _TABLE_TYPES:
            raise ConfigError(f"unknown table [{name}] (known: {', '.join(_TABLE_TYPES)})")
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        cls = _TABLE_TYPES[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, v in value.items():
            if key not in fields:
                raise ConfigError(f"unknown key {key!r} in [{name}] (known: {', '.join(fields)})")
            f = fields[key]
            kwargs[key] = _coerce(name, key, v, str(f.type))
        tables[name] = cls(**kwargs)
    cfg = TrainConfig(**tables)
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks: sizes positive, one epoch count per level, stages in range."""
    d, s, sc, r = cfg.data, cfg.ssl, cfg.schedule, cfg.routing
    _check(d.image_size >= 8, f"[data] image_size must be >= 8, got {d.image_size}")
    _check(d.channels in (1, 3), f"[data] channels must be 1 or 3, got {d.channels}")
    _check(d.limit is None or d.limit > 0, f"[data] limit must be positive, got {d.limit}")
    _check(0.0 <= d.val_fraction < 0.9, f"[data] val_fraction must lie in [0, 0.9), got "
                                        f"{d.val_fraction}")
    _check(len(r.branching) >= 1 and all(b >= 1 for b in r.branching),
           f"[routing] branching must be a non-empty list of positive integers, got {r.branching}")
    _check(len(sc.level_epochs) == len(r.branching),
           f"[schedule] level_epochs needs one entry per routing level ({len(r.branching)}), "
           f"got {list(sc.level_epochs)}")
    _check(sc.phase0_epochs >= 1, f"[schedule] phase0_epochs must be >= 1, got {sc.phase0_epochs}")
    _check(all(e >= 0 for e in sc.level_epochs), "[schedule] level_epochs must be >= 0")
    _check(s.batch_size >= 2, f"[ssl] batch_size must be >= 2, got {s.batch_size}")
    _check(s.lr > 0, f"[ssl] lr must be positive, got {s.lr}")
    _check(0.0 <= s.kd_weight <= 1.0, f"[ssl] kd_weight must lie in [0, 1], got {s.kd_weight}")
    _check(s.proj_dim >= 2 and s.pred_hidden >= 1, "[ssl] proj_dim and pred_hidden must be positive")
    _check(cfg.cluster.backend in ("auto", "faiss", "sklearn"),
           f"[cluster] backend must be auto, faiss or sklearn, got {cfg.cluster.backend!r}")
    _check(cfg.cluster.iters >= 1, "[cluster] iters must be >= 1")
    _check(cfg.cluster.sample is None or cfg.cluster.sample >= max(r.branching),
           "[cluster] sample must be at least the largest branching")
    _check(cfg.kit.epochs >= 0, "[kit] epochs must be >= 0")
    _check(cfg.train.device in ("auto", "cpu", "cuda"),
           f"[train] device must be auto, cpu or cuda, got {cfg.train.device!r}")
    _check(cfg.train.knn_every >= 0, "[train] knn_every must be >= 0")
    _check(cfg.train.threads >= 0, "[train] threads must be >= 0")
    a = cfg.augment
    _check(0.0 < a.crop_min <= a.crop_max <= 1.0,
           f"[augment] need 0 < crop_min <= crop_max <= 1, got {a.crop_min}, {a.crop_max}")
    _check(0.0 <= a.jitter < 1.0, f"[augment] jitter must lie in [0, 1), got {a.jitter}")
    _check(0.0 <= a.blur_p <= 1.0, f"[augment] blur_p must lie in [0, 1], got {a.blur_p}")
    _check(cfg.train.knn_max >= 1, "[train] knn_max must be >= 1")
    bb = cfg.backbone_config()
    if r.level_stages is not None:
        _check(len(r.level_stages) == len(r.branching),
               f"[routing] level_stages needs one stage per level, got {list(r.level_stages)}")
        _check(len(set(r.level_stages)) == len(r.level_stages),
               "[routing] level_stages must not repeat a stage")
        _check(all(0 <= v < bb.num_stages for v in r.level_stages),
               f"[routing] level_stages must lie in 0..{bb.num_stages - 1}")
    else:
        _check(len(r.branching) <= bb.num_stages,
               f"[routing] {len(r.branching)} levels need at least as many backbone stages "
               f"(the model has {bb.num_stages})")


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> TrainConfig:
    """Parse a TOML config file; `overrides` (table -> key -> value) win over the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a TOML text file (byte {exc.start} is not UTF-8)") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for table, values in (overrides or {}).items():
        raw.setdefault(table, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as TOML text (what RUN_DIR/config.toml holds)."""
    return tomli_w.dumps(cfg.to_dict())


def parse_config_text(text: str) -> TrainConfig:
    return config_from_dict(tomllib.loads(text))
