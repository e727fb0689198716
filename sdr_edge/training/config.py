"""The training config: TOML tables validated into frozen pydantic models, with clear errors.

Every table and key has a default (written once, on its field), so a config file only says what
differs. Unknown tables or keys are errors (a typo must not silently train with a default), and
values are strict: TOML has types, so `amp = 1` or `batch_size = "big"` is a mistake, not
something to coerce. Every error is one line naming the file, the table and the key. The resolved
config is written to RUN_DIR/config.toml, which makes a run directory self-describing and lets a
rerun detect that it would resume a different run.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdr_edge.data.augment import AugmentConfig
from sdr_edge.errors import SdrEdgeError
from sdr_edge.models.resnet import BackboneConfig
from sdr_edge.models.sdrnet import default_level_stages


class ConfigError(SdrEdgeError, ValueError):
    """A config file that cannot be used; each line names the table and key."""


# TOML arrays arrive as lists: the tuple itself is lax (list -> tuple), its items stay strict.
IntTuple = Annotated[tuple[int, ...], Field(strict=False)]


class _Section(BaseModel):
    """Strict, frozen, closed: what every table of the config shares."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class DataConfig(_Section):
    """Which images and at what size; `val_fraction` is held out for the kNN monitor.

    `source` is a built-in spec (held in memory), an image folder (streamed: decoded batch by
    batch) or `shards:DIR` (written by `sdr-server shards`). `limit` keeps a seeded subset,
    chosen from the file list before any decode. `decode_size` (default: image_size) decodes
    larger so the random resized crop cuts from more pixels. `workers` DataLoader processes
    decode batches ahead of the step (0: in the training process); `pin_memory` pins them for
    asynchronous copies to a GPU; `prefetch` is batches each worker keeps ready.
    """

    source: str = ""
    image_size: int = Field(default=28, ge=8)
    channels: int = 1
    limit: int | None = Field(default=None, gt=0)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=0.9)
    decode_size: int | None = None
    workers: int = Field(default=0, ge=0)
    pin_memory: bool = False
    prefetch: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _decode_not_smaller(self) -> DataConfig:
        if self.decode_size is not None and self.decode_size < self.image_size:
            raise ValueError(f"decode_size must be >= image_size ({self.image_size}), "
                             f"got {self.decode_size}")
        return self

    @field_validator("channels")
    @classmethod
    def _gray_or_rgb(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError(f"must be 1 or 3, got {v}")
        return v


class ModelConfig(_Section):
    """A backbone preset with optional overrides of its shape."""

    preset: str = "small"
    widths: IntTuple | None = None
    blocks: IntTuple | None = None
    stem_width: int | None = None
    # Zero the last BN gamma of every residual branch at init (sdr_edge.models.resnet.
    # zero_residual_gammas): SimSiam's ResNet-50 recipe; off by default, measured ~10 points
    # worse on the small CPU-bench nets.
    zero_init_residual: bool = False


class RoutingConfig(_Section):
    """Experts per level (K = product) and which stage serves each level.

    The default is K = 16, the two deepest stages routed (`branching = [4, 4]`), not the
    paper's K = 256 (`[4, 4, 4, 4]`, kept in configs/imagenet.toml). On the mixed CPU pool of
    issue 10 (3 pre-training seeds x 6 tasks, whole task sets, paired within a seed) the
    routed K = 16 sub-net's probe accuracy beat K = 256's by +1.7 +- 1.1 points (round 4) and
    by +0.6 +- 1.4 when retrained by today's code (round 5), positive on all six seed pairs.
    At K = 256 the shallow experts see 1/64-1/256 of the pool and its routed sub-net is no
    better than a random one (docs/claim.md, rounds 4 and 5).
    """

    branching: IntTuple = (4, 4)
    level_stages: IntTuple | None = None
    codes: Literal["residual", "tree"] = "residual"
    """How a level's digit relates to its parent's. "residual": residual k-means, digit b_r
    means one residual direction for every parent, and stage r holds B_r shared experts.
    "tree": hierarchical k-means, b_r splits the parent's cell, and stage r holds one expert
    per node (B_1 ... B_r). Residual is the default: in round 8 (docs/claim.md; 3 seeds x 6 tasks,
    same teachers) the routed tree sub-net scored 0.6 +- 0.9 points lower over the 18 pairs and
    its route beat random by -0.1, because the signature's per-level marginals mix the children
    of different parents, which mean the same only under residual codes."""

    @field_validator("branching")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or not all(b >= 1 for b in v):
            raise ValueError(f"must be a non-empty list of positive integers, got {list(v)}")
        return v

    @field_validator("level_stages")
    @classmethod
    def _distinct(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"must not repeat a stage, got {list(v)}")
        return v


class SSLConfig(_Section):
    """SimSiam heads and optimiser; `batch_size` is global (split across DDP ranks)."""

    proj_dim: int = Field(default=256, ge=2)
    pred_hidden: int = Field(default=64, ge=1)
    batch_size: int = Field(default=256, ge=2)
    lr: float = Field(default=0.05, gt=0.0)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    kd_weight: float = 0.5

    @field_validator("kd_weight")
    @classmethod
    def _unit(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must lie in [0, 1], got {v}")
        return v


class ScheduleConfig(_Section):
    """Epochs of phase 0 (unified SimSiam) and of each progressive routing level."""

    phase0_epochs: int = Field(default=10, ge=1)
    level_epochs: IntTuple = (4, 4)  # one entry per [routing] branching level
    # An SDR run whose phase-0 teacher (and heads) this run takes instead of training its own:
    # several SDR recipes then share one teacher, as SDR shares one unified model (issue 10).
    teacher_from: str | None = None
    # Which parameters the level phases train: "all" (stem, shared stages, experts, heads) or
    # "experts" (the routed stages' experts and the heads; stem and shared stages stay the
    # teacher's, so sub-nets differ only where they are routed).
    level_train: Literal["all", "experts"] = "all"
    # The level phases' peak learning rate as a fraction of [ssl] lr (each phase restarts a
    # cosine from it). Default 2.0: on issue 10's mixed CPU pool (K = 16, 3 seeds, whole task
    # sets, docs/claim.md round 7) restarting at 2 x beat 1 x by +2.1 +- 2.2 routed probe points on
    # today's-code teachers (+2.2 +- 2.1 on the stored ones; every seed positive), and beat the
    # same schedule without experts (K = 1) by +1.0 +- 2.0; 0.2 x lost 2.9 +- 1.4. The unified
    # model has no level phases, so this does not touch it. configs/imagenet.toml keeps 1.0:
    # unmeasured at that scale.
    level_lr_scale: float = Field(default=2.0, gt=0.0, le=4.0)
    # How the routed experts' learning rate is set in the level phases: "shared" (the same rate
    # as every other parameter) or "per-cell" (x B at a stage of B experts). Each expert sees
    # about 1/B of a batch and the loss is a batch mean, so under "shared" its gradient, and
    # its step, is about 1/B of what it would be on a batch of its own cell.
    expert_lr: Literal["shared", "per-cell"] = "shared"

    @field_validator("level_epochs")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not all(e >= 0 for e in v):
            raise ValueError(f"must be >= 0, got {list(v)}")
        return v


class ClusterConfig(_Section):
    """Residual k-means backend, iterations, and how many points fit each level's centroids
    (None: all; every point is still assigned)."""

    backend: Literal["auto", "faiss", "sklearn"] = "auto"
    iters: int = Field(default=25, ge=1)
    sample: int | None = None


class KitConfig(_Section):
    """Epochs of the signature kit's distillation."""

    epochs: int = Field(default=5, ge=0)


class AugmentSection(_Section):
    """SimSiam view strengths (sdr_edge.data.augment): crop area range, horizontal flips (off
    for digits or text), colour jitter (brightness/contrast `jitter`, `saturation`, `hue`) with
    probability `jitter_p`, random grayscale and Gaussian blur (sigma in output pixels).
    Saturation, hue and grayscale act on 3-channel images only. The defaults are SimSiam's
    ImageNet recipe except the blur, whose sigma is scaled down for small images, and the crop's
    smallest area, 0.4 instead of 0.2 (measured at 28 px; sdr_edge.data.augment says why)."""

    crop_min: float = 0.4  # SimSiam's is 0.2 at 224 px; 0.4 measured best at 28 px (round 6)
    crop_max: float = 1.0
    # "torchvision": RandomResizedCrop's redraw-until-it-fits sides; "clamped": one (area,
    # aspect) draw with each side clamped to the image (sdr_edge.data.augment says what won)
    crop_mode: Literal["torchvision", "clamped"] = "torchvision"
    flip: bool = True
    jitter: float = Field(default=0.4, ge=0.0, lt=1.0)
    saturation: float = Field(default=0.4, ge=0.0, lt=1.0)
    hue: float = Field(default=0.1, ge=0.0, le=0.5)
    jitter_p: float = Field(default=0.8, ge=0.0, le=1.0)
    grayscale_p: float = Field(default=0.2, ge=0.0, le=1.0)
    blur_p: float = Field(default=0.5, ge=0.0, le=1.0)
    blur_sigma_min: float = Field(default=0.1, gt=0.0)
    blur_sigma_max: float = Field(default=1.5, gt=0.0)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentSection:
        if not 0.0 < self.crop_min <= self.crop_max <= 1.0:
            raise ValueError(f"need 0 < crop_min <= crop_max <= 1, got {self.crop_min}, "
                             f"{self.crop_max}")
        if self.blur_sigma_min > self.blur_sigma_max:
            raise ValueError(f"need blur_sigma_min <= blur_sigma_max, got "
                             f"{self.blur_sigma_min}, {self.blur_sigma_max}")
        return self

    def to_augment_config(self, out_size: int | None = None) -> AugmentConfig:
        """The augmentation of training views, written at `out_size` (the training size)."""
        return AugmentConfig(crop_scale=(self.crop_min, self.crop_max), crop_mode=self.crop_mode,
                             flip=self.flip, brightness=self.jitter, contrast=self.jitter,
                             saturation=self.saturation, hue=self.hue, jitter_p=self.jitter_p,
                             grayscale_p=self.grayscale_p, blur_p=self.blur_p,
                             blur_sigma=(self.blur_sigma_min, self.blur_sigma_max),
                             out_size=out_size)


class GPUSection(_Section):
    """How training uses an accelerator (each is harmless on a CPU run).

    `sync_batchnorm` converts BatchNorm to SyncBatchNorm under DDP (SimSiam does, its BN sees the
    global batch); routed experts keep per-rank BatchNorm, since a rank whose batch holds no
    image of an expert would never join that expert's all-reduce. `channels_last` stores
    weights and views NHWC (faster convolutions on tensor cores). `compile` runs the model
    through torch.compile (off by default: compiling takes minutes, and routed stages break
    graphs). Pinned memory and non-blocking copies are [data] pin_memory.
    """

    sync_batchnorm: bool = False
    channels_last: bool = False
    compile: bool = False


class TrainSection(_Section):
    """Seed, device, CPU threads, and how often the kNN monitor runs (0: never).

    `threads` sets torch's intra-op threads (0 keeps torch's default). Small models on a shared
    CPU run far faster with 1: OpenMP threads spin-wait on each other when the cores are busy.
    `amp` runs forward passes under bfloat16 autocast on CUDA (ignored on CPU).
    """

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0)
    amp: bool = False
    knn_every: int = Field(default=1, ge=0)
    knn_max: int = Field(default=20000, ge=1)
    # Under torchrun: how long a collective waits for a missing rank before the run fails, and
    # how long the other ranks wait (outside any collective) for rank 0's k-means and kit
    # (sdr_edge.training.distributed.run_on_main).
    collective_timeout_s: float = Field(default=1800.0, gt=0)
    main_step_timeout_s: float = Field(default=86400.0, gt=0)


class TrainConfig(_Section):
    """The whole resolved config of one `sdr-server train` run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    ssl: SSLConfig = Field(default_factory=SSLConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    kit: KitConfig = Field(default_factory=KitConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    gpu: GPUSection = Field(default_factory=GPUSection)

    @model_validator(mode="after")
    def _cross_table(self) -> TrainConfig:
        """Checks that span tables; each message names the table and key it is about."""
        r, sc = self.routing, self.schedule
        if len(sc.level_epochs) != len(r.branching):
            raise ValueError(f"[schedule] level_epochs needs one entry per routing level "
                             f"({len(r.branching)}), got {list(sc.level_epochs)}")
        if self.cluster.sample is not None and self.cluster.sample < max(r.branching):
            raise ValueError(f"[cluster] sample must be at least the largest branching "
                             f"({max(r.branching)}), got {self.cluster.sample}")
        stages = self.backbone_config().num_stages
        if r.level_stages is not None:
            if len(r.level_stages) != len(r.branching):
                raise ValueError(f"[routing] level_stages needs one stage per level "
                                 f"({len(r.branching)}), got {list(r.level_stages)}")
            if not all(0 <= v < stages for v in r.level_stages):
                raise ValueError(f"[routing] level_stages must lie in 0..{stages - 1}, got "
                                 f"{list(r.level_stages)}")
        elif len(r.branching) > stages:
            raise ValueError(f"[routing] {len(r.branching)} levels need at least as many "
                             f"backbone stages (the model has {stages})")
        return self

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
        """TOML-ready dict: tuples as lists, None values dropped (TOML has no null)."""
        return self.model_dump(mode="json", exclude_none=True)

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> TrainConfig:
        """A validated copy with `overrides` (table -> key -> value) applied; None values are
        skipped (an unset CLI flag). Unlike model_copy(update=...), the result is checked."""
        raw = self.to_dict()
        for table, values in overrides.items():
            raw.setdefault(table, {}).update({k: v for k, v in values.items() if v is not None})
        return config_from_dict(raw)


_CHECKS = {
    "int_type": "must be an integer", "float_type": "must be a number",
    "bool_type": "must be true or false", "string_type": "must be a string",
    "tuple_type": "must be a list of integers", "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}  # fmt: skip


def _where(loc: tuple[int | str, ...]) -> str:
    """`[table] key[2]` for a pydantic error location."""
    if not loc:
        return ""
    text = f"[{loc[0]}]"
    if len(loc) > 1:
        text += f" {loc[1]}" + "".join(f"[{i}]" for i in loc[2:])
    return text


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as one line that names `[table] key`."""
    loc, kind, msg = tuple(error["loc"]), error["type"], error["msg"]
    where = _where(loc)
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return f"unknown table [{loc[0]}] (known: {', '.join(TrainConfig.model_fields)})"
        section = TrainConfig.model_fields[str(loc[0])].annotation
        known = ", ".join(getattr(section, "model_fields", {}))
        return f"unknown key {loc[-1]!r} in [{loc[0]}] (known: {known})"
    if kind in _CHECKS:
        return f"{where} {_CHECKS[kind]}, got {error['input']!r}"
    if kind == "value_error":
        msg = str(error["ctx"]["error"]) if "ctx" in error else msg.removeprefix("Value error, ")
        return f"{where} {msg}" if where else msg
    return f"{where}: {msg}" if where else msg


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from parsed TOML; every problem is one line."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e) for e in exc.errors())) from None


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
        section = raw.setdefault(table, {})
        if isinstance(section, dict):  # a non-table is reported by validation below
            section.update({k: v for k, v in values.items() if v is not None})
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from None


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as TOML text (what RUN_DIR/config.toml holds)."""
    return tomli_w.dumps(cfg.to_dict())


def parse_config_text(text: str) -> TrainConfig:
    return config_from_dict(tomllib.loads(text))
