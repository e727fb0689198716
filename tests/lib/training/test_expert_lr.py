"""`[schedule] expert_lr = "per-cell"`: a stage of B experts learns at B x the rate in the level
phases, only once its level is split, and the default leaves the optimiser as it was."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers_rundir import tiny_train_config

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.models.resnet import Backbone, BackboneConfig
from sdr_edge.models.sdrnet import RoutedStage, SDRnet
from sdr_edge.ssl.heads import SimSiamHeads
from sdr_edge.training.config import SSLConfig, config_from_dict
from sdr_edge.training.pipeline import run_identity, train, with_current_defaults
from sdr_edge.training.siamese import SiameseNet, make_optimizer, set_cosine_lr


def _siamese() -> SiameseNet:
    cfg = BackboneConfig.preset("small", in_channels=1, widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1),
                                stem_width=8)
    net = SDRnet.from_backbone(Backbone(cfg), (4, 2))
    return SiameseNet(net, SimSiamHeads(net.feature_dim, 16, 8))


def test_default_optimiser_has_the_two_groups_and_scaled_groups_multiply_the_decaying_rate():
    model = _siamese()
    ssl = SSLConfig()
    plain = make_optimizer(model, ssl, 256)
    assert len(plain.param_groups) == 2 and all("lr_mult" not in g for g in plain.param_groups)

    net = model.encoder
    deepest = list(net.stages[net.level_stages[0]].parameters())
    opt = make_optimizer(model, ssl, 256, scaled=[(deepest, 4.0)])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    lr = set_cosine_lr(opt, 0.1, 25, 100)
    rest, pred, experts = opt.param_groups
    assert rest["lr"] == pytest.approx(lr) and pred["lr"] == pytest.approx(0.1)
    assert experts["lr"] == pytest.approx(4.0 * lr)
    assert {id(p) for p in experts["params"]} == {id(p) for p in deepest}


def _expert_shift(run: Path) -> float:
    """Mean over routed stages of ||expert - teacher stage|| / ||teacher stage||."""
    net, _ = rd.load_sdrnet(run)
    teacher, _ = rd.load_teacher(run)
    shifts = []
    for s, stage in enumerate(net.stages):
        if not isinstance(stage, RoutedStage):
            continue
        ref = torch.cat([p.detach().flatten() for p in teacher.stages[s].parameters()])
        for expert in stage.experts:
            mine = torch.cat([p.detach().flatten() for p in expert.parameters()])
            shifts.append(float((mine - ref).norm() / ref.norm()))
    return sum(shifts) / len(shifts)


def test_per_cell_experts_move_further_from_the_teacher(tmp_path):
    base = tmp_path / "shared"
    tables = {"train": {"knn_every": 0}, "ssl": {"kd_weight": 0.0}}
    train(config_from_dict(tiny_train_config(**tables)), base)
    per_cell = tmp_path / "per-cell"
    cfg = tiny_train_config(**tables, schedule={"teacher_from": str(base),
                                                "expert_lr": "per-cell"})
    train(config_from_dict(cfg), per_cell)
    rd.verify_run_manifest(per_cell)
    shared, scaled = _expert_shift(base), _expert_shift(per_cell)
    assert shared > 0
    assert scaled > 1.4 * shared, (shared, scaled)


def test_unknown_expert_lr_is_refused_naming_the_key():
    with pytest.raises(Exception, match="expert_lr"):
        config_from_dict(tiny_train_config(schedule={"expert_lr": "double"}))


def test_a_run_identity_from_before_a_key_existed_matches_at_the_keys_default():
    cfg = config_from_dict(tiny_train_config())
    current = {"kind": "sdr", "config": run_identity(cfg)}
    old = copy.deepcopy(current)
    del old["config"]["schedule"]["expert_lr"]
    assert with_current_defaults(old) == current
    changed = copy.deepcopy(current)
    changed["config"]["schedule"]["expert_lr"] = "per-cell"
    assert with_current_defaults(changed) != current
    assert with_current_defaults({"config": {"schedule": {"expert_lr": 3}}}) == \
        {"config": {"schedule": {"expert_lr": 3}}}
    assert with_current_defaults(None) is None
