"""The phases of `sdr-server train`, resumable after a crash at any epoch boundary.

SDR run:     phase0 (SimSiam teacher) -> cluster (residual k-means codes) -> level_1..level_R
             (split a level's experts, SiamKD against the frozen teacher) -> kit -> report.
Unified run: one SimSiam phase on the same backbone for the same total epochs -> report.

After every epoch the trainable state goes to RUN_DIR/checkpoints/last.safetensors together
with (phase, epochs done, metrics.jsonl size). Finished phases leave their artifacts in the run
dir (teacher, codes, sdrnet), so a rerun of the same command skips them, reloads what they made
and replays only the unfinished epochs. Only rank 0 writes files.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.artifacts.atomic import atomic_write_text, sha256_file
from sdr_edge.artifacts.weights import load_tensors
from sdr_edge.data.folder import SourceError
from sdr_edge.data.pool import ImagePool, MemoryPool, channel_stats, open_pool, rank_share
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.errors import SdrEdgeError
from sdr_edge.models.resnet import Backbone, zero_residual_gammas
from sdr_edge.models.sdrnet import RoutedStage, SDRnet
from sdr_edge.ssl.heads import SimSiamHeads
from sdr_edge.training import distributed as dd
from sdr_edge.training.checkpoint import (
    RESTART_HINT,
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    discard_checkpoints,
    load_checkpoint,
    previous_path,
    restore_rng,
    save_checkpoint,
    set_aside,
)
from sdr_edge.training.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    dump_config,
    parse_config_text,
)
from sdr_edge.training.epochs import EpochPlan, iter_features, knn_monitor, train_epoch
from sdr_edge.training.metrics import MetricsLog
from sdr_edge.training.siamese import FrozenTeacher, SiameseNet, make_optimizer, scaled_lr
from sdr_edge.training.tracking import RunTracker

log = logging.getLogger(__name__)

PHASE0, CLUSTER, KIT, DONE, UNIFIED = "phase0", "cluster", "kit", "done", "unified"
MAX_LOGGED_SKIPS = 1000
EMBEDDINGS = "embeddings.f16.npy"  # under RUN/work while the cluster phase runs
EMBED_BATCH = 256  # images per embedding batch (host RAM: see sdr_edge.training.estimate)


def with_current_defaults(identity: Any) -> Any:
    """A checkpoint's run identity with config keys added since it was written set to their
    defaults: a run from before a key existed is the same run when the key is at its default
    (each new key's default keeps the old behaviour). Unparseable identities stay as they are,
    so the comparison still refuses them."""
    if not isinstance(identity, dict) or not isinstance(identity.get("config"), dict):
        return identity
    try:
        config = run_identity(config_from_dict(identity["config"]))
    except (ConfigError, ValueError, TypeError):
        return identity
    return {**identity, "config": config}


class RunConflictError(SdrEdgeError, ValueError):
    """RUN_DIR holds something this command must not overwrite or resume."""


def level_phase(r: int) -> str:
    """Metrics/checkpoint name of routing level r (0-based): 'level_1', 'level_2', ..."""
    return f"level_{r + 1}"


def phase_order(levels: int, unified: bool) -> list[str]:
    if unified:
        return [UNIFIED, DONE]
    return [PHASE0, CLUSTER, *[level_phase(r) for r in range(levels)], KIT, DONE]


@dataclass
class TrainResult:
    """What a finished (or already finished) run reports back to the CLI."""

    run_dir: Path
    kind: str
    resumed: bool
    already_done: bool
    skipped_images: int
    num_images: int
    seconds: float
    rank: int = 0


def split_indices(n: int, has_labels: bool, val_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a seeded hold-out for the kNN monitor when labels exist."""
    if not has_labels or val_fraction <= 0 or n < 10:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _same_spec(a: InputSpec, b: InputSpec) -> bool:
    """Equal input specs; mean and std to 1e-9 (summation order may differ between processes)."""
    da, db = a.to_dict(), b.to_dict()
    close = all(np.allclose(da[k], db[k], rtol=1e-9, atol=0.0) for k in ("mean", "std"))
    return close and {k: v for k, v in da.items() if k not in ("mean", "std")} == {
        k: v for k, v in db.items() if k not in ("mean", "std")}


def freeze_shared(net: SDRnet) -> None:
    """Stop gradients to the stem and the unrouted stages: only experts (and heads) train."""
    for module in [net.stem, *(s for s in net.stages if not isinstance(s, RoutedStage))]:
        for p in module.parameters():
            p.requires_grad_(False)


def load_teacher_heads(run_dir: Path, cfg: TrainConfig, feature_dim: int) -> SimSiamHeads:
    """The teacher's projector and predictor, stored as 'heads.*' in teacher.safetensors."""
    tensors, _ = load_tensors(Path(run_dir) / rd.TEACHER)
    heads = SimSiamHeads(feature_dim, cfg.ssl.proj_dim, cfg.ssl.pred_hidden)
    heads.load_state_dict({k[len("heads."):]: v for k, v in tensors.items()
                           if k.startswith("heads.")})
    return heads


def _first_difference(a: Any, b: Any, path: str = "", where: str = "the checkpoint") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key),
                                         f"{path}.{key}" if path else key, where)
    return f"{path}: {a!r} in {where}, {b!r} now"


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The config a checkpoint must match to be resumed: all of it except how images are
    loaded ([data] workers, pin_memory, prefetch), which changes speed, never the pixels, and
    the [train] timeouts (a run that timed out resumes with a longer one). As JSON reads it
    back (tuples as lists), so it compares equal to the one a checkpoint stored."""
    raw = json.loads(json.dumps(cfg.to_dict()))
    raw["data"] = {k: v for k, v in raw.get("data", {}).items()
                   if k not in ("workers", "pin_memory", "prefetch")}
    raw["train"] = {k: v for k, v in raw.get("train", {}).items()
                    if k not in ("collective_timeout_s", "main_step_timeout_s")}
    return raw


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, int | float | str | bool | list) or v is None}


class Trainer:
    """Runs (or resumes) one training run into `run_dir`."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, unified: bool = False,
                 env: dd.DistEnv | None = None, restart: bool = False) -> None:
        if not cfg.data.source:
            raise ConfigError("no data source: pass --data SOURCE or set [data] source")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.unified = unified
        self.restart = restart
        self.kind = "unified" if unified else "sdr"
        self.env = env or dd.DistEnv()
        self.metrics = MetricsLog(self.run_dir, enabled=self.env.is_main)
        self.tracker = RunTracker(self.run_dir, cfg, enabled=self.env.is_main)
        self.order = phase_order(len(cfg.routing.branching), unified)
        self.identity = {"kind": self.kind, "config": run_identity(cfg)}
        self.ckpt: Checkpoint | None = None
        self.artifacts: dict[str, str] = {}  # sha256 of the run-dir files this run wrote

    # ----- resume bookkeeping -------------------------------------------------------------

    def _position(self) -> tuple[int, int]:
        if self.ckpt is None:
            return (-1, 0)
        return (self.order.index(self.ckpt.meta["phase"]), int(self.ckpt.meta["epoch"]))

    def _past(self, phase: str) -> bool:
        """The checkpoint says `phase` finished and its artifacts are in the run dir (one-shot
        phases, cluster and kit, checkpoint epoch 1 when they are done)."""
        index, epoch = self._position()
        here = self.order.index(phase)
        return index > here or (index == here and phase in (CLUSTER, KIT) and epoch >= 1)

    def _resuming(self, phase: str) -> bool:
        return self.ckpt is not None and self.ckpt.meta["phase"] == phase

    def _checkpoint(self, phase: str, epoch: int, modules: dict[str, nn.Module] | None = None,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
        if self.env.is_main:
            save_checkpoint(self.run_dir, {"phase": phase, "epoch": epoch,
                                           "identity": self.identity,
                                           "metrics_bytes": self.metrics.size(),
                                           "artifacts": dict(self.artifacts)},
                            modules, optimizers)

    def _wrote(self, path: Path) -> None:
        """Remember a phase artifact's sha256: later checkpoints record it, a resume checks it."""
        self.artifacts[path.name] = sha256_file(path)

    def _verify_artifacts(self) -> None:
        """The phase artifacts a resume reloads must be the ones the checkpoint saw written."""
        assert self.ckpt is not None
        recorded = self.ckpt.meta.get("artifacts") or {}
        for name, digest in sorted(recorded.items()):
            path = self.run_dir / name
            if not path.is_file() or sha256_file(path) != digest:
                state = "is missing" if not path.is_file() else "is corrupt"
                raise CheckpointError(f"{path} {state} (it does not match the sha256 recorded "
                                      f"in {self.ckpt.path}): {RESTART_HINT}")
        self.artifacts = dict(recorded)

    def _check_ours(self, restart: bool) -> None:
        """Refuse an --out that is a file, or a non-empty folder sdr-server train did not write.

        Without a checkpoint, a folder is ours when every top-level entry is a run-dir name (or
        a staging leftover) and config.toml parses as a training config equal to this one.
        """
        out = self.run_dir
        if out.exists() and not out.is_dir():
            raise RunConflictError(f"--out {out} is a file, not a folder; pass a run folder")
        if not out.is_dir() or not any(out.iterdir()):
            return
        if not restart and any(p.is_file() for p in (checkpoint_path(out), previous_path(out))):
            return  # the checkpoint's own format and identity checks decide
        foreign = rd.foreign_entries(out)
        config = out / rd.CONFIG
        if foreign or not config.is_file():
            what = f"it holds {foreign[0]!r}" if foreign else f"it has no {rd.CONFIG}"
            raise RunConflictError(f"{out} is not empty and is not a run folder of sdr-server "
                                   f"train ({what}); pass another --out")
        try:
            theirs = parse_config_text(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise RunConflictError(f"{out} is not empty and its {rd.CONFIG} is not an sdr-edge "
                                   f"training config ({str(exc).splitlines()[0]}); "
                                   "pass another --out") from None
        if run_identity(theirs) != run_identity(self.cfg):
            diff = _first_difference(run_identity(theirs), run_identity(self.cfg), where=rd.CONFIG)
            raise RunConflictError(f"{out} holds a different run ({diff}); pass another --out, "
                                   "or delete the folder to start over")

    def _open_run_dir(self, restart: bool = False) -> bool:
        """Check RUN_DIR, clean a killed run's staging leftovers, load a checkpoint of the same
        run; True when it is already finished. `restart` discards the run's own checkpoints."""
        self._check_ours(restart)
        self.ckpt = None
        if not self.run_dir.is_dir():
            return False
        if restart:
            if self.env.is_main:
                for p in discard_checkpoints(self.run_dir):
                    log.info("--restart: removed %s", p)
                (self.run_dir / rd.MANIFEST).unlink(missing_ok=True)  # it describes the old run
        else:
            self.ckpt = load_checkpoint(self.run_dir)
        if self.ckpt is not None:
            stored = with_current_defaults(self.ckpt.meta.get("identity"))
            if stored != self.identity:
                diff = _first_difference(stored, self.identity)
                raise RunConflictError(
                    f"{self.run_dir} holds a different run ({diff}); pass another --out, "
                    "or delete the folder to start over")
            self._verify_artifacts()
            if self.ckpt.fallback is not None and self.env.is_main:
                log.warning("%s; resuming from %s", self.ckpt.fallback, self.ckpt.path)
        elif not restart and (self.run_dir / rd.MANIFEST).exists():
            raise RunConflictError(
                f"{self.run_dir} holds a finished run without checkpoints; pass another --out, "
                "or --restart to train it again from the start")
        if self.env.is_main:  # only now is the folder known to be ours
            for p in rd.clean_staging(self.run_dir):
                log.info("removed %s (left by an interrupted run)", p)
        return self.ckpt is not None and self.ckpt.meta["phase"] == DONE and (
            self.run_dir / rd.MANIFEST).exists()

    # ----- data ---------------------------------------------------------------------------

    def _load_data(self) -> None:
        """Open the pool (a folder or shards only list their files here) and derive the split
        and the input spec; streamed pools' channel statistics are decoded by rank 0 alone."""
        d, seed = self.cfg.data, self.cfg.train.seed
        self.pool: ImagePool = open_pool(d, seed)
        self.labels = self.pool.labels
        self.train_index, self.val_index = split_indices(
            len(self.pool), self.labels is not None, d.val_fraction, seed)
        if isinstance(self.pool, MemoryPool) or not self.env.distributed:
            mean, std = channel_stats(self.pool, self.train_index, seed=seed)
        else:
            stats = torch.zeros(2, d.channels, dtype=torch.float64)
            if self.env.is_main:
                stats = torch.tensor(channel_stats(self.pool, self.train_index, seed=seed),
                                     dtype=torch.float64)
            self.env.broadcast(stats)
            mean, std = (tuple(float(v) for v in row) for row in stats)
        self.spec = InputSpec(d.image_size, d.channels, mean, std, tuple(self.pool.label_names))
        per_rank = min(self.cfg.ssl.batch_size, len(self.train_index)) // self.env.world_size
        if per_rank < 2:
            raise SourceError(f"{d.source}: {len(self.train_index)} training image(s) are too few "
                             f"for batches across {self.env.world_size} process(es)")
        self.global_batch = per_rank * self.env.world_size

    def _plan(self, phase_id: int) -> EpochPlan:
        d = self.cfg.data
        return EpochPlan(self.pool, self.train_index, self.spec, self.global_batch,
                         self.cfg.train.seed, phase_id,
                         self.cfg.augment.to_augment_config(self.cfg.data.image_size),
                         workers=d.workers, pin_memory=d.pin_memory, prefetch=d.prefetch)

    @property
    def skipped(self) -> list[str]:
        """Files the pool could not decode (a streamed pool finds them as it reads them)."""
        return list(getattr(self.pool, "skipped", []))

    def _images_array(self) -> np.ndarray | None:
        """The whole pool as one array, for consumers not yet streamed (kit, report montage):
        a memory pool's own array; None for a streamed pool (never decoded whole)."""
        return self.pool.images if isinstance(self.pool, MemoryPool) else None

    # ----- generic phase ------------------------------------------------------------------

    def _wrap(self, model: nn.Module, find_unused: bool) -> nn.Module:
        """What a phase trains through: [gpu] options applied, DDP when distributed."""
        g = self.cfg.gpu
        return dd.prepare_model(model, self.env, find_unused=find_unused,
                                sync_batchnorm=g.sync_batchnorm, channels_last=g.channels_last,
                                compile_model=g.compile)

    def _knn(self, model: SiameseNet, codes: torch.Tensor | None) -> float | None:
        if not self.env.is_main:
            return None
        model.eval()
        if codes is None:
            def encode(x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
                return model.encoder(x)
        else:
            def encode(x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
                return model.encoder(x, codes[torch.from_numpy(idx)].to(x.device))
        return knn_monitor(encode, self.pool, self.train_index, self.val_index, self.spec,
                           self.env.device, self.cfg.train.knn_max, self.cfg.train.seed,
                           workers=self.cfg.data.workers)

    def _train_phase(self, phase: str, phase_id: int, model: SiameseNet, wrapped: nn.Module,
                     opt: torch.optim.Optimizer, epochs: int, start_epoch: int, *,
                     codes: torch.Tensor | None = None, teacher: FrozenTeacher | None = None,
                     lr_scale: float = 1.0) -> None:
        plan = self._plan(phase_id)
        base_lr = scaled_lr(self.cfg.ssl, self.global_batch) * lr_scale
        every = self.cfg.train.knn_every
        track = self.tracker.phase(phase)
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            stats = train_epoch(wrapped, opt, plan, epoch, epochs, base_lr, self.env, codes=codes,
                                teacher=teacher, kd_weight=self.cfg.ssl.kd_weight,
                                amp=self.cfg.train.amp, desc=f"{phase} {epoch + 1}/{epochs}",
                                channels_last=self.cfg.gpu.channels_last, on_step=track.step)
            knn = None
            if every and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
                knn = self._knn(model, codes)
            seconds = time.perf_counter() - t0
            self.metrics.epoch(phase, epoch + 1, stats["loss"], knn, seconds,
                               images_per_s=stats["images_per_s"], steps=stats["steps"],
                               **{k: stats[k] for k in ("data_wait", "collapse_std") if k in stats})
            track.epoch(epoch + 1, stats, knn)
            if self.env.is_main:
                knn_text = "" if knn is None else f", kNN acc {knn:.3f}"
                log.info("%s epoch %d/%d: loss %.4f%s (%.1f s, %.0f img/s)", phase, epoch + 1,
                         epochs, stats["loss"], knn_text, seconds, stats["images_per_s"])
            self._checkpoint(phase, epoch + 1, {"model": model}, {"sgd": opt})
        dd.sync_buffers(model, self.env)

    def _new_siamese(self, encoder: Backbone | SDRnet, heads: SimSiamHeads | None = None
                     ) -> SiameseNet:
        heads = heads or SimSiamHeads(encoder.feature_dim, self.cfg.ssl.proj_dim,
                                      self.cfg.ssl.pred_hidden)
        return SiameseNet(encoder, heads).to(self.env.device)

    def _restore(self, phase: str, model: nn.Module, opt: torch.optim.Optimizer) -> int:
        """Load the checkpoint's state when resuming inside `phase`; returns epochs done."""
        if not self._resuming(phase):
            return 0
        assert self.ckpt is not None
        model.load_state_dict(self.ckpt.modules["model"])
        opt.load_state_dict(self.ckpt.optimizers["sgd"])
        return int(self.ckpt.meta["epoch"])

    # ----- the phases ---------------------------------------------------------------------

    def _phase0(self) -> tuple[Backbone, SimSiamHeads]:
        bcfg = self.cfg.backbone_config()
        phase = UNIFIED if self.unified else PHASE0
        if self._past(phase):
            backbone, _ = rd.load_teacher(self.run_dir)
            return backbone, load_teacher_heads(self.run_dir, self.cfg, bcfg.feature_dim)
        if self.cfg.schedule.teacher_from and not self.unified:
            return self._borrow_teacher(Path(self.cfg.schedule.teacher_from))
        epochs = self.cfg.total_epochs if self.unified else self.cfg.schedule.phase0_epochs
        backbone = Backbone(bcfg)
        if self.cfg.model.zero_init_residual:
            zero_residual_gammas(backbone)
        model = self._new_siamese(backbone)
        opt = make_optimizer(model, self.cfg.ssl, self.global_batch)
        start = self._restore(phase, model, opt)
        self._train_phase(phase, 0 if not self.unified else 100, model,
                          self._wrap(model, find_unused=False), opt, epochs, start)
        dd.revert_sync_batchnorm(model)
        backbone = model.encoder.cpu()
        heads = model.heads.cpu()
        if self.env.is_main:
            self._wrote(rd.save_teacher(self.run_dir, backbone, self.spec,
                                        extra=heads.state_dict()))
        self._final_digest(model)
        return backbone, heads

    def _borrow_teacher(self, source: Path) -> tuple[Backbone, SimSiamHeads]:
        """Phase 0 taken from another SDR run (`[schedule] teacher_from`): its teacher and heads,
        refused unless they were trained for this backbone on this run's data and spec."""
        bcfg = self.cfg.backbone_config()
        where = f"[schedule] teacher_from = {str(source)!r}"
        try:
            backbone, spec = rd.load_teacher(source)
            if backbone.cfg.to_dict() != bcfg.to_dict():
                raise RunConflictError(f"{where}: its backbone {backbone.cfg.to_dict()} is not "
                                       f"this run's {bcfg.to_dict()}")
            heads = load_teacher_heads(source, self.cfg, bcfg.feature_dim)
        except RunConflictError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise RunConflictError(f"{where}: {str(exc).splitlines()[0]}") from None
        if not _same_spec(spec, self.spec):
            raise RunConflictError(f"[schedule] teacher_from = {str(source)!r}: its input spec "
                                   f"{spec.to_dict()} differs from this run's {self.spec.to_dict()}"
                                   " (another pool, limit or seed)")
        if self.env.is_main:
            self._wrote(rd.save_teacher(self.run_dir, backbone, self.spec,
                                        extra=heads.state_dict()))
            log.info("phase 0: teacher taken from %s", source)
        self.metrics.event("teacher_from", run=str(source))
        self._checkpoint(PHASE0, self.cfg.schedule.phase0_epochs)
        return backbone, heads

    def _embed_all(self, backbone: Backbone) -> np.ndarray:
        """L2-normalised teacher features of every image as float16 rows of a memory map,
        RUN/work/embeddings.f16.npy (N x D x 2 bytes on disk, never all in RAM): each rank
        embeds its share of the pool batch by batch and writes its own rows (the ranks share
        the run dir's file system; see sdr_edge.clustering.embedding_store). Read-only map."""
        from sdr_edge.clustering import embedding_store as es

        pool = self.pool
        path = self.run_dir / rd.WORK_DIR / EMBEDDINGS
        backbone = backbone.to(self.env.device).eval()
        if self.env.is_main:
            es.create(path, len(pool), backbone.feature_dim)
        self.env.barrier()
        rows = es.open_rows(path, "r+")
        mine = rank_share(len(pool), self.env.rank, self.env.world_size)
        def encode(x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
            return torch.nn.functional.normalize(backbone(x).float(), dim=1)

        for idx, feats in iter_features(encode, pool, mine, self.spec, self.env.device,
                                        EMBED_BATCH, self.cfg.data.workers):
            es.write_rows(rows, idx, feats.numpy())
        rows.flush()
        del rows
        backbone.cpu()
        self.env.barrier()  # every rank's rows are on disk
        return es.open_rows(path, "r")

    def _cluster(self, teacher: Backbone) -> torch.Tensor:
        """Codes of every image: residual k-means fitted on `[cluster] sample` training rows of
        the embeddings memory map and assigned chunk by chunk, on rank 0 outside any collective
        (`dd.run_on_main`), then broadcast."""
        levels = len(self.cfg.routing.branching)
        n = len(self.pool)
        if self._past(CLUSTER):
            codes, _ = rd.load_codes(self.run_dir)
            if codes.shape != (n, levels):
                raise RunConflictError(f"{self.run_dir}: codes.safetensors has shape "
                                       f"{tuple(codes.shape)}, expected {(n, levels)}")
            return codes
        from sdr_edge.clustering.streamed import fit_sample_assign_chunks

        t0 = time.perf_counter()
        emb = self._embed_all(teacher)

        def fit() -> torch.Tensor:
            c = self.cfg.cluster
            result = fit_sample_assign_chunks(emb, self.cfg.routing.branching,
                                              rows=self.train_index, sample=c.sample,
                                              iters=c.iters, seed=self.cfg.train.seed,
                                              backend=c.backend, size_rows=self.train_index,
                                              tree=self.cfg.routing.codes == "tree")
            codes = torch.from_numpy(result.codes)
            books = [torch.from_numpy(np.asarray(b, dtype=np.float32))
                     for b in result.fit.codebooks]
            self._wrote(rd.save_codebooks(self.run_dir, books, self.cfg.routing.codes))
            self._wrote(rd.save_codes(self.run_dir, codes, self.cfg.data.source))
            self.metrics.epoch(CLUSTER, 1, result.residual, None, time.perf_counter() - t0,
                               backend=result.fit.backend, fit_rows=len(result.fit_rows),
                               sizes=[list(map(int, s)) for s in result.sizes])
            log.info("clustered %d embeddings (centroids fitted on %d) into K=%d cells with %s "
                     "(residual %.4f, %.1f s)", n, len(result.fit_rows), self.cfg.num_subnets,
                     result.fit.backend, result.residual, time.perf_counter() - t0)
            return codes

        marker = self.run_dir / rd.WORK_DIR / "cluster.done"
        fitted = dd.run_on_main(self.env, fit, marker, what="clustering",
                                timeout_s=self.cfg.train.main_step_timeout_s)
        codes = fitted if fitted is not None else torch.zeros(n, levels, dtype=torch.long)
        self.env.broadcast(codes)
        if self.env.is_main:  # scratch: the codes and codebooks are what the run keeps
            (self.run_dir / rd.WORK_DIR / EMBEDDINGS).unlink(missing_ok=True)
        self._checkpoint(CLUSTER, 1)
        return codes

    def _levels(self, teacher: Backbone, teacher_heads: SimSiamHeads, codes: torch.Tensor) -> SDRnet:
        """Progressive training: split level r's experts, then SiamKD routed by the codes."""
        if self._past(level_phase(len(self.cfg.routing.branching) - 1)):
            return rd.load_sdrnet(self.run_dir)[0]
        net = SDRnet.from_backbone(teacher, self.cfg.routing.branching,
                                   self.cfg.resolved_level_stages(), self.cfg.routing.codes)
        model = self._new_siamese(net, copy.deepcopy(teacher_heads))
        frozen = FrozenTeacher(copy.deepcopy(teacher), copy.deepcopy(teacher_heads.projector))
        frozen.to(self.env.device)
        first, resumed = 0, False
        pos = self._position()
        for r in range(len(self.cfg.routing.branching)):
            if self.order.index(level_phase(r)) == pos[0]:
                first, resumed = r, True
        if resumed:
            assert self.ckpt is not None
            model.load_state_dict(self.ckpt.modules["model"])
        if self.cfg.schedule.level_train == "experts":
            freeze_shared(net)
        wrapped = self._wrap(model, find_unused=True)
        for r in range(first, len(self.cfg.routing.branching)):
            phase = level_phase(r)
            if not self._resuming(phase):
                net.split_level(r)
            opt = make_optimizer(model, self.cfg.ssl, self.global_batch,
                                 scaled=self._expert_lr_groups(net, r))
            start = self._restore(phase, model, opt)
            self._train_phase(phase, r + 1, model, wrapped, opt, self.cfg.schedule.level_epochs[r],
                              start, codes=codes, teacher=frozen,
                              lr_scale=self.cfg.schedule.level_lr_scale)
        dd.revert_sync_batchnorm(model)
        net = model.encoder.cpu()
        if self.env.is_main:
            self._wrote(rd.save_sdrnet(self.run_dir, net, self.spec))
        self._final_digest(model)
        self._checkpoint(KIT, 0)
        return net

    def _expert_lr_groups(self, net: SDRnet, level: int) -> list[tuple[list[nn.Parameter], float]]:
        """Under `expert_lr = "per-cell"`, the experts of every level active in phase `level`
        learn at B x the rate, B their stage's expert count (levels not yet split route every
        image to expert 0, so they keep the shared rate)."""
        if self.cfg.schedule.expert_lr != "per-cell":
            return []
        return [(list(net.stages[net.level_stages[r]].parameters()), float(net.expert_counts[r]))
                for r in range(level + 1)]

    def _kit(self, codes: torch.Tensor) -> None:
        if self._past(KIT):
            return
        if self.cfg.kit.epochs < 1:
            if self.env.is_main:
                log.info("[kit] epochs = 0: no signature kit in this run")
            self.metrics.event("kit_skipped", reason="[kit] epochs = 0")
        elif importlib.util.find_spec("sdr_edge.routing.kit") is None:
            if self.env.is_main:
                log.warning("sdr_edge.routing.kit is not installed: no signature kit in this run")
            self.metrics.event("kit_skipped", reason="sdr_edge.routing.kit not available")
        else:
            from sdr_edge.routing.kit import train_signature_kit

            def step() -> None:
                t0 = time.perf_counter()
                result = train_signature_kit(self.pool, codes.numpy(),
                                             self.cfg.routing.branching, self.spec,
                                             self.run_dir / rd.KIT_DIR,
                                             epochs=self.cfg.kit.epochs, seed=self.cfg.train.seed,
                                             device=str(self.env.device),
                                             workers=self.cfg.data.workers)
                extra = _json_safe(dict(result or {}))
                loss = extra.pop("loss", None)
                for key in ("phase", "epoch", "knn_acc", "time"):
                    extra.pop(key, None)
                self.metrics.epoch(KIT, self.cfg.kit.epochs, loss, None,
                                   time.perf_counter() - t0, **extra)
                log.info("signature kit: %s", json.dumps(extra, sort_keys=True))

            dd.run_on_main(self.env, step, self.run_dir / rd.WORK_DIR / "kit.done",
                           what="signature kit", timeout_s=self.cfg.train.main_step_timeout_s)
        self.env.barrier()
        self._checkpoint(KIT, 1)

    def _final_digest(self, model: nn.Module) -> None:
        """Under DDP, prove every rank ends with identical weights (logged to metrics.jsonl)."""
        if not self.env.distributed:
            return
        digests = dd.gather_digests(model, self.env)
        self.metrics.event("ddp_weights", world_size=self.env.world_size, digests=digests)
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {digests}")

    def _report(self) -> None:
        if not self.env.is_main or importlib.util.find_spec("sdr_edge.report") is None:
            return
        from sdr_edge.report import make_training_report

        try:
            paths = make_training_report(self.run_dir, images=self._images_array())
            log.info("report: %d file(s) in %s", len(paths), self.run_dir / rd.REPORT_DIR)
        except Exception as exc:  # a plotting failure must not lose a finished training run
            log.warning("training report failed: %s: %s", type(exc).__name__, exc)
            self.metrics.event("report_failed", error=f"{type(exc).__name__}: {exc}")

    # ----- entry point --------------------------------------------------------------------

    def run(self) -> TrainResult:
        t0 = time.perf_counter()
        done = self._open_run_dir(self.restart)
        self.env.barrier()
        if self.ckpt is not None and self.ckpt.fallback is not None and self.env.is_main:
            set_aside(checkpoint_path(self.run_dir))  # every rank has read it: never let it be prev
        if done:
            skipped = json.loads((self.run_dir / rd.MANIFEST).read_text()).get("skipped_images", 0)
            return TrainResult(self.run_dir, self.kind, False, True, int(skipped), 0, 0.0,
                               self.env.rank)
        self._load_data()
        torch.manual_seed(self.cfg.train.seed)
        np.random.seed(self.cfg.train.seed % (2**32))
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / rd.CONFIG, dump_config(self.cfg))
        resumed = self.ckpt is not None
        if resumed:
            assert self.ckpt is not None
            restore_rng(self.ckpt)
            self.metrics.truncate(int(self.ckpt.meta["metrics_bytes"]))
            pos = (self.ckpt.meta["phase"], int(self.ckpt.meta["epoch"]))
            if self.env.is_main:
                log.info("resuming from checkpoint: phase %s, %d epoch(s) done", *pos)
            self.metrics.event("resumed", phase=pos[0], epoch=pos[1])
            if self.ckpt.fallback is not None:
                self.metrics.event("checkpoint_fallback", reason=self.ckpt.fallback,
                                   used=str(self.ckpt.path))
        else:
            self.metrics.truncate(0)
            self.metrics.event("skipped_images", count=len(self.skipped),
                               paths=self.skipped[:MAX_LOGGED_SKIPS],
                               truncated=len(self.skipped) > MAX_LOGGED_SKIPS)
            self.metrics.event("data", source=self.cfg.data.source, images=len(self.pool),
                               train=len(self.train_index), val=len(self.val_index),
                               global_batch=self.global_batch, world_size=self.env.world_size,
                               device=str(self.env.device))

        teacher, heads = self._phase0()
        if not self.unified:
            codes = self._cluster(teacher)
            net = self._levels(teacher, heads, codes)
            self._kit(codes)
            del net
        self.tracker.close()
        self._report()
        if self.env.is_main:
            info = {"kind": self.kind, "source": self.cfg.data.source,
                    "num_images": len(self.pool), "num_train": len(self.train_index),
                    "skipped_images": len(self.skipped), "input_spec": self.spec.to_dict(),
                    "architecture": {"backbone": self.cfg.backbone_config().to_dict()}}
            if not self.unified:
                info["branching"] = list(self.cfg.routing.branching)
                info["level_stages"] = list(self.cfg.resolved_level_stages())
                if self.cfg.routing.codes != "residual":
                    info["codes"] = self.cfg.routing.codes
            rd.write_run_manifest(self.run_dir, info)
        self._checkpoint(DONE, 0)
        self.env.barrier()
        return TrainResult(self.run_dir, self.kind, resumed, False, len(self.skipped),
                           len(self.pool), time.perf_counter() - t0, self.env.rank)


def train(cfg: TrainConfig, run_dir: str | Path, *, unified: bool = False,
          source: str | None = None, restart: bool = False) -> TrainResult:
    """Set up (distributed) devices, run or resume the training, tear down."""
    if source:
        cfg = cfg.with_overrides({"data": {"source": source}})
    threads = torch.get_num_threads()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    env = dd.setup(cfg.train.device, cfg.train.collective_timeout_s)
    try:
        return Trainer(cfg, run_dir, unified=unified, env=env, restart=restart).run()
    finally:
        dd.teardown(env)
        torch.set_num_threads(threads)  # leave an embedding process as it was
