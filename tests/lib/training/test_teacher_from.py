"""SDR recipes on one teacher: `[schedule] teacher_from` borrows another run's phase 0,
`level_train = "experts"` keeps the stem and shared stages at the teacher's weights, and a
teacher from another pool or backbone is refused with the key named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_rundir import tiny_train_config

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.bench.budgets import BUDGETS
from sdr_edge.bench.paper_claim import BenchError
from sdr_edge.bench.recipes import parse_recipes, plan_of, recipe_config
from sdr_edge.models.sdrnet import RoutedStage
from sdr_edge.training.config import config_from_dict
from sdr_edge.training.pipeline import RunConflictError, train

TINY = tiny_train_config(train={"knn_every": 0})


def _with(**tables: dict) -> dict:
    return tiny_train_config(train={"knn_every": 0}, **tables)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipes") / "base"
    train(config_from_dict(TINY), out)
    return out


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_borrowed_teacher_is_the_base_runs_and_phase0_is_not_retrained(base_run, tmp_path):
    out = tmp_path / "experts"
    train(config_from_dict(_with(schedule={"teacher_from": str(base_run),
                                           "level_train": "experts"})), out)
    a, _ = rd.load_teacher(base_run)
    b, _ = rd.load_teacher(out)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    phases = {m.get("phase") for m in map(json.loads,
                                          (out / rd.METRICS).read_text().splitlines())}
    assert "phase0" not in phases and "level_1" in phases
    rd.verify_run_manifest(out)

    # experts-only: stem and unrouted stages still hold the teacher's weights, experts moved
    net, _ = rd.load_sdrnet(out)
    for mine, theirs in zip(_params(net.stem), _params(a.stem), strict=True):
        assert torch.equal(mine, theirs)
    moved = False
    for s, stage in enumerate(net.stages):
        if isinstance(stage, RoutedStage):
            ref = _params(a.stages[s])
            moved |= any(not torch.equal(p, q) for e in stage.experts
                         for p, q in zip(_params(e), ref, strict=True))
        else:
            for mine, theirs in zip(_params(stage), _params(a.stages[s]), strict=True):
                assert torch.equal(mine, theirs)
    assert moved, "no expert trained"


def test_all_parameters_train_by_default(base_run):
    net, _ = rd.load_sdrnet(base_run)
    teacher, _ = rd.load_teacher(base_run)
    assert any(not torch.equal(p, q) for p, q in zip(_params(net.stem), _params(teacher.stem),
                                                     strict=True))


def test_a_teacher_from_another_backbone_or_pool_is_refused(base_run, tmp_path):
    wider = _with(model={"widths": [8, 8, 16, 32]}, schedule={"teacher_from": str(base_run)})
    with pytest.raises(RunConflictError, match=r"teacher_from.*backbone"):
        train(config_from_dict(wider), tmp_path / "wider")
    other = _with(data={"limit": 150}, schedule={"teacher_from": str(base_run)})
    with pytest.raises(RunConflictError, match=r"teacher_from.*input spec"):
        train(config_from_dict(other), tmp_path / "other")
    missing = _with(schedule={"teacher_from": str(tmp_path / "nowhere")})
    with pytest.raises(RunConflictError, match=r"teacher_from = .*nowhere"):
        train(config_from_dict(missing), tmp_path / "missing")


def test_recipe_names_and_plans():
    assert parse_recipes("kd0, coarse4+kd0") == ["base", "kd0", "coarse4+kd0"]
    with pytest.raises(BenchError, match="unknown recipe 'kd2'"):
        parse_recipes("kd0,kd2")
    budget = BUDGETS["cpu"]
    plan = plan_of(budget, "coarse4+kd0")
    assert plan.branching == (4,) and plan.level_epochs == (sum(budget.level_epochs_k256),)
    assert plan.overrides == {"ssl": {"kd_weight": 0.0}}
    deep = plan_of(budget, "deep2")
    assert deep.branching == (4, 4) and sum(deep.level_epochs) == sum(budget.level_epochs_k256)
    early = plan_of(budget, "deep2+early")  # same total epochs, 40 % of phase 0 moved
    assert early.phase0_epochs == 6 and early.level_epochs == (6, 6)
    assert early.phase0_epochs + sum(early.level_epochs) == budget.total_epochs
    own = recipe_config(budget, "deep2+early", 0, Path("base"))
    assert own["schedule"]["phase0_epochs"] == 6 and "teacher_from" not in own["schedule"]
    shared = recipe_config(budget, "deep2", 0, Path("base"))
    assert shared["schedule"]["teacher_from"] == "base"
    long = plan_of(budget, "deep2+long")  # order matters: deep2 splits, then long doubles
    assert long.branching == (4, 4) and long.level_epochs == tuple(2 * e for e in deep.level_epochs)
    assert plan_of(budget, "shallow-coarse").overrides["routing"]["level_stages"] == [0, 1, 2, 3]
    # round 6's crops: the old default's area range, and the pre-rewrite clamped crop
    assert plan_of(budget, "deep2+crop0.3").overrides == {"augment": {"crop_min": 0.3}}
    clamped = recipe_config(budget, "deep2+clamped", 0, Path("base"))
    assert clamped["augment"] == {"crop_mode": "clamped", "crop_min": 0.3}
    assert config_from_dict(clamped).augment.to_augment_config().crop_mode == "clamped"
    # round 7's learning-rate restarts of the level phases, within the config's bound (<= 4)
    for name, scale in (("deep2+lr0.2", 0.2), ("deep2+lr1", 1.0), ("deep2", 2.0)):
        cfg = config_from_dict(recipe_config(budget, name, 0, Path("base")))
        assert cfg.schedule.level_lr_scale == scale and cfg.routing.branching == (4, 4)
