"""Budgets of the paper-claim benchmark: how much pool, model and training each one buys.

`cpu` must finish within an hour on a 2-core CPU machine; `full` is for a GPU; `minute` is
the smoke-test budget the test suite runs. Every budget trains the unified model and the
SDRnets with the same backbone for the same total epochs. CPU budgets use one intra-op thread:
these small convolutions run several times faster that way on a busy 2-core machine (torch's
OpenMP threads spin-wait on each other), measured 600 vs 140 images/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sdr_edge.training.finetune import FineTuneConfig


@dataclass(frozen=True)
class TaskSpec:
    """A labelled downstream task: a source (with optional class filter) and its size cap."""

    name: str
    source: str
    limit: int | None


@dataclass(frozen=True)
class Budget:
    name: str
    pool: str
    pool_limit: int | None
    image_size: int
    widths: tuple[int, ...]
    stem_width: int
    batch_size: int
    phase0_epochs: int
    level_epochs_k256: tuple[int, ...]
    level_epochs_k16: tuple[int, ...]
    kit_epochs: int
    task_limit: int | None
    candidates_k16: str
    candidates_k256: str
    finetune_epochs: int
    finetune_lr: float
    threads: int = 0
    kd_weight: float = 0.5
    task_set: str = "fashion"  # "fashion" (four Fashion-MNIST/digits tasks) or "domains"
    random_routes: int = 8  # seeded random routes probed as the routed sub-net's control
    proj_dim: int = 128
    pred_hidden: int = 32
    lr: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def total_epochs(self) -> int:
        return self.phase0_epochs + sum(self.level_epochs_k256)


TASK_SETS = ("fashion", "domains")


def tasks(budget: Budget) -> list[TaskSpec]:
    """The budget's downstream tasks: `fashion` are the four tasks of issue 6 (class indices of
    Fashion-MNIST), `domains` the mixed-pool tasks of sdr_edge.bench.domains."""
    lim = budget.task_limit
    if budget.task_set == "fashion":
        return [
            TaskSpec("fashion-10", "fashion-mnist:test", lim),
            TaskSpec("footwear-3", "fashion-mnist:test@5,7,9", lim),
            TaskSpec("tops-4", "fashion-mnist:test@0,2,4,6", lim),
            TaskSpec("digits-10", "builtin:digits", lim),
        ]
    if budget.task_set == "domains":
        try:  # lazy: the mixed-pool module is optional and heavier than this one
            from sdr_edge.bench.domains import domain_tasks
        except ImportError as exc:
            raise ValueError(f"task set 'domains' needs sdr_edge.bench.domains.domain_tasks "
                             f"({exc})") from exc
        return [t if isinstance(t, TaskSpec) else TaskSpec(t.name, t.source, t.limit)
                for t in domain_tasks(lim)]
    raise ValueError(f"unknown task set {budget.task_set!r} ({', '.join(TASK_SETS)})")


BUDGETS: dict[str, Budget] = {
    "minute": Budget(
        name="minute", pool="fashion-mnist:train", pool_limit=500, image_size=16,
        widths=(8, 8, 16, 16), stem_width=8, batch_size=128, phase0_epochs=1,
        level_epochs_k256=(1, 1, 1, 1), level_epochs_k16=(2, 2), kit_epochs=1, task_limit=200,
        candidates_k16="top2", candidates_k256="top2", finetune_epochs=1,
        finetune_lr=FineTuneConfig.lr,
        proj_dim=32, pred_hidden=8, threads=1, random_routes=2,
    ),
    "cpu": Budget(
        name="cpu", pool="fashion-mnist:train", pool_limit=12000, image_size=28,
        widths=(8, 16, 32, 64), stem_width=8, batch_size=256, phase0_epochs=10,
        level_epochs_k256=(2, 2, 2, 2), level_epochs_k16=(4, 4), kit_epochs=6, task_limit=2000,
        candidates_k16="all", candidates_k256="top32", finetune_epochs=FineTuneConfig.epochs,
        finetune_lr=FineTuneConfig.lr,
        threads=1,
    ),
    "full": Budget(
        name="full", pool="fashion-mnist:train", pool_limit=None, image_size=28,
        widths=(32, 64, 128, 256), stem_width=32, batch_size=512, phase0_epochs=80,
        level_epochs_k256=(10, 10, 10, 10), level_epochs_k16=(20, 20), kit_epochs=20,
        task_limit=None, candidates_k16="all", candidates_k256="all",
        finetune_epochs=FineTuneConfig.epochs,
        finetune_lr=FineTuneConfig.lr, proj_dim=512, pred_hidden=128,
    ),
}


def train_config_dict(budget: Budget, branching: tuple[int, ...], level_epochs: tuple[int, ...],
                      seed: int) -> dict:
    """The `sdr-server train` config (as a TOML-ready dict) of one pre-training run."""
    return {
        "data": {"source": budget.pool, "image_size": budget.image_size, "channels": 1,
                 "val_fraction": 0.1, **({"limit": budget.pool_limit} if budget.pool_limit else {})},
        "model": {"preset": "small", "widths": list(budget.widths), "blocks": [1] * len(budget.widths),
                  "stem_width": budget.stem_width},
        "routing": {"branching": list(branching)},
        "ssl": {"proj_dim": budget.proj_dim, "pred_hidden": budget.pred_hidden,
                "batch_size": budget.batch_size, "lr": budget.lr, "momentum": 0.9,
                "weight_decay": 1e-4, "kd_weight": budget.kd_weight},
        "schedule": {"phase0_epochs": budget.phase0_epochs, "level_epochs": list(level_epochs)},
        "cluster": {"backend": "auto", "iters": 20},
        "kit": {"epochs": budget.kit_epochs},
        "train": {"seed": seed, "device": "auto", "threads": budget.threads, "knn_every": 0},
    }
