"""Training: config validation, checkpoint round trip, DDP sharding, routed gradients, and the
real `sdr-server train` on builtin:digits with configs/tiny.toml (SDR and --unified)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.models import BackboneConfig, SDRnet
from sdr_edge.training.checkpoint import load_checkpoint, save_checkpoint
from sdr_edge.training.config import ConfigError, load_config, parse_config_text
from sdr_edge.training.distributed import DistEnv, rank_batches
from sdr_edge.training.metrics import read_metrics
from sdr_edge.training.pipeline import split_indices

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny.toml"


def run_train(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "sdr_edge_server.cli", "train", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ----- config ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, subnets", [("tiny", 16), ("fashion", 16), ("imagenet", 256)])
def test_shipped_configs_load(name, subnets):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.num_subnets == subnets
    assert len(cfg.schedule.level_epochs) == len(cfg.routing.branching)
    assert parse_config_text(__import__("tomli_w").dumps(cfg.to_dict())) == cfg


def test_the_default_is_the_measured_k16():
    """K = 16 (two deepest stages routed) beat the paper's K = 256 on the mixed CPU pool
    (docs/claim.md, Round 4); a config without [routing] and [schedule] must still resolve."""
    cfg = parse_config_text("")
    assert cfg.routing.branching == (4, 4) and cfg.schedule.level_epochs == (4, 4)
    assert cfg.num_subnets == 16 and cfg.resolved_level_stages() == (3, 2)


@pytest.mark.parametrize("text, message", [
    ("[ssl]\nlrr = 0.1\n", "unknown key 'lrr' in \\[ssl\\]"),
    ("[sssl]\nlr = 0.1\n", "unknown table \\[sssl\\]"),
    ("[schedule]\nlevel_epochs = [1, 1, 1]\n", "\\[schedule\\] level_epochs needs one entry per"),
    ("[ssl]\nbatch_size = \"big\"\n", "\\[ssl\\] batch_size must be an integer"),
    ("[cluster]\nbackend = \"gpu\"\n", "\\[cluster\\] backend"),
    ("[routing]\nbranching = [4, 4, 4, 4, 4]\nlevel_stages = [0, 1, 2, 3, 3]\n"
     "[schedule]\nlevel_epochs = [1, 1, 1, 1, 1]\n", "level_stages must not repeat"),
    ("[routing]\nbranching = [2, 2, 2, 2, 2]\n[schedule]\nlevel_epochs = [1, 1, 1, 1, 1]\n",
     "5 levels need at least as many backbone stages"),
    ("[model]\npreset = \"vgg\"\n", "\\[model\\]: unknown backbone preset"),
    ("[ssl]\nkd_weight = 2\n", "kd_weight must lie in"),
    ("[train]\namp = 1\n", "\\[train\\] amp must be true or false"),
    ("[augment]\ncrop_min = 0\n", "\\[augment\\] need 0 < crop_min"),
])
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_or_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("[ssl\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "x.toml")


def test_config_errors_name_file_and_key_on_each_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nknn_max = 0\n[data]\nchannels = true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == [
        f"{path}: [data] channels must be an integer, got True",
        f"{path}: [train] knn_max: Input should be greater than or equal to 1"]
    cfg = load_config(TINY, {"train": {"seed": 7, "device": None}})
    assert cfg.train.seed == 7 and cfg.train.device == "auto"
    assert cfg.with_overrides({"data": {"source": "x"}}).data.source == "x"
    with pytest.raises(ConfigError, match=r"\[ssl\] lr: Input should be greater than 0"):
        cfg.with_overrides({"ssl": {"lr": 0.0}})  # a copy is validated, unlike model_copy
    with pytest.raises(ValueError):
        cfg.train.seed = 1  # frozen: a resolved config is what config.toml records


# ----- building blocks -------------------------------------------------------------------

def test_checkpoint_round_trips_module_and_optimizer_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, {"phase": "phase0", "epoch": 3}, {"model": model}, {"sgd": opt})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.meta["phase"] == "phase0" and ckpt.meta["epoch"] == 3
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model2.load_state_dict(ckpt.modules["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    opt2.load_state_dict(ckpt.optimizers["sgd"])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 0.1
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    bufs2 = [opt2.state[p]["momentum_buffer"] for p in model2.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(bufs, bufs2, strict=True))
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write left no temp file
    assert load_checkpoint(tmp_path / "elsewhere") is None


def test_rank_batches_shard_each_global_batch_disjointly():
    perm = np.random.default_rng(0).permutation(103)
    shards = [rank_batches(perm, 20, DistEnv(rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5  # 103 // 20, the partial batch is dropped
    for step in range(5):
        a, b = shards[0][step], shards[1][step]
        assert len(a) == len(b) == 10 and not set(a) & set(b)
        assert set(a) | set(b) == set(perm[step * 20:(step + 1) * 20])
    with pytest.raises(ValueError, match="fewer than 2 images per rank"):
        rank_batches(perm, 3, DistEnv(rank=0, world_size=2))


def test_split_indices_hold_out_only_with_labels():
    train, val = split_indices(100, True, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    assert np.array_equal(split_indices(100, True, 0.2, seed=0)[1], val)
    train, val = split_indices(100, False, 0.2, seed=0)
    assert len(train) == 100 and len(val) == 0


def test_routed_gradients_equal_a_per_expert_reference():
    """The sort-and-split RoutedStage gives the same outputs and gradients as running every
    image's experts by hand (plain indexing, autograd's own backward)."""
    cfg = BackboneConfig.preset("small", in_channels=1, widths=(4, 8, 8, 8), stem_width=4)
    net = SDRnet(cfg, (3, 2))
    for r in range(2):
        net.split_level(r)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    net.eval()
    x = torch.randn(9, 1, 8, 8, generator=g)
    codes = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0], [2, 1], [1, 0], [0, 1], [2, 1], [1, 1]])
    w = torch.randn(9, cfg.feature_dim, generator=g)
    (net(x, codes) * w).sum().backward()
    fast = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    total = 0
    for i in range(9):  # reference: one image at a time through its own route
        total = total + (net(x[i:i + 1], codes[i]) * w[i]).sum()
    total.backward()
    for n, p in net.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(fast[n], ref, atol=1e-5), n


# ----- the real CLI ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    start = time.perf_counter()
    proc = run_train("--data", "builtin:digits", "--config", TINY, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, time.perf_counter() - start


@pytest.mark.slow
def test_tiny_sdr_run_produces_every_artifact(tiny_run):
    out, proc, seconds = tiny_run
    print(f"tiny SDR run: {seconds:.1f} s")
    assert "skipped 0 unreadable image file(s)" in proc.stdout
    manifest = rd.verify_run_manifest(out)
    assert manifest["kind"] == "sdr" and manifest["branching"] == [4, 4]
    for name in (rd.CONFIG, rd.METRICS, rd.TEACHER, rd.CODEBOOKS, rd.CODES, rd.SDRNET):
        assert name in manifest["files"], name
    net, spec = rd.load_sdrnet(out)
    assert net.num_subnets == 16 and int(net.active_levels) == 2
    assert spec.image_size == 16 and spec.channels == 1 and len(spec.label_names) == 10
    codes, meta = rd.load_codes(out)
    assert codes.shape == (1797, 2) and meta["source"] == "builtin:digits"
    for r in range(2):  # no dead expert: every digit of every level has images
        assert torch.bincount(codes[:, r], minlength=4).min() > 0
    assert [c.shape for c in rd.load_codebooks(out)] == [(4, 32)] * 2
    teacher, _ = rd.load_teacher(out)
    assert teacher.feature_dim == 32
    # the phases, in order, with finite losses; kNN above chance (10 classes) at the end
    metrics = read_metrics(out)
    phases = [m["phase"] for m in metrics if "phase" in m]
    order = list(dict.fromkeys(phases))
    assert order[:4] == ["phase0", "cluster", "level_1", "level_2"]
    cfg = load_config(TINY)
    epochs = [m for m in metrics if m.get("phase") == "phase0"]
    assert [m["epoch"] for m in epochs] == list(range(1, cfg.schedule.phase0_epochs + 1))
    assert all(np.isfinite(m["loss"]) and m["time"] >= 0 for m in metrics if "loss" in m
               and m["loss"] is not None)
    last = [m for m in metrics if m.get("phase") == "level_2" and m.get("knn_acc") is not None]
    assert last and last[-1]["knn_acc"] > 0.6
    skipped = [m for m in metrics if m.get("event") == "skipped_images"]
    assert skipped == [{"event": "skipped_images", "count": 0, "paths": [], "truncated": False}]
    config_text = (out / rd.CONFIG).read_text()
    assert 'source = "builtin:digits"' in config_text and "branching" in config_text
    if (out / rd.KIT_DIR).is_dir():
        assert "kit" in order and any(f.startswith("kit/") for f in manifest["files"])
    if (out / rd.REPORT_DIR / "index.html").is_file():
        for png in ("loss.png", "knn.png", "clusters_level1.png", "codes_level_1.png"):
            assert (out / rd.REPORT_DIR / png).is_file(), png


@pytest.mark.slow
def test_rerun_of_finished_run_and_conflicting_run(tiny_run, tmp_path):
    out, _, _ = tiny_run
    again = run_train("--data", "builtin:digits", "--config", TINY, "--out", out)
    assert again.returncode == 0 and "already complete" in again.stdout
    other = tmp_path / "other.toml"
    other.write_text(TINY.read_text().replace("kd_weight = 0.5", "kd_weight = 0.25"))
    clash = run_train("--data", "builtin:digits", "--config", other, "--out", out)
    assert clash.returncode == 2
    assert "holds a different run" in clash.stderr and "kd_weight" in clash.stderr


@pytest.mark.slow
def test_unified_baseline_run(tmp_path):
    out = tmp_path / "unified"
    proc = run_train("--data", "builtin:digits", "--config", TINY, "--out", out, "--unified")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = rd.verify_run_manifest(out)
    assert manifest["kind"] == "unified"
    assert not (out / rd.SDRNET).exists() and not (out / rd.CODES).exists()
    backbone, spec = rd.load_teacher(out)
    cfg = load_config(TINY)
    assert backbone.cfg == cfg.backbone_config() and spec.image_size == 16
    metrics = read_metrics(out)
    unified = [m for m in metrics if m.get("phase") == "unified"]
    assert len(unified) == cfg.total_epochs  # same total epochs as the SDR run
    assert unified[-1]["knn_acc"] > 0.6
    if (out / rd.REPORT_DIR).is_dir():
        assert (out / rd.REPORT_DIR / "loss.png").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from sdr_edge_server.cli import main

    def train(*args) -> tuple[int, str]:
        code = main(["train", *map(str, args)])
        return code, capsys.readouterr().err

    code, err = train("--config", tmp_path / "missing.toml", "--out", tmp_path / "o")
    assert code == 2 and "config file not found" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep me")
    code, err = train("--config", TINY, "--out", busy)
    assert code == 2 and "not empty" in err
    assert (busy / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty_src"
    empty.mkdir()
    code, err = train("--config", TINY, "--out", tmp_path / "o2", "--data", empty)
    assert code == 2 and "no image file" in err and "empty_src" in err


def test_resume_bookkeeping_skips_finished_phases(tmp_path):
    from sdr_edge.training.checkpoint import Checkpoint
    from sdr_edge.training.pipeline import Trainer

    k256 = {"routing": {"branching": [4, 4, 4, 4]}, "schedule": {"level_epochs": [2, 2, 2, 2]}}
    trainer = Trainer(load_config(TINY, k256), tmp_path / "run")  # four levels to step through
    assert trainer.order == ["phase0", "cluster", "level_1", "level_2", "level_3", "level_4",
                             "kit", "done"]
    trainer.ckpt = Checkpoint(meta={"phase": "cluster", "epoch": 1})
    assert trainer._past("phase0") and trainer._past("cluster") and not trainer._past("level_1")
    trainer.ckpt = Checkpoint(meta={"phase": "level_2", "epoch": 2})
    assert trainer._past("level_1") and not trainer._past("level_2")
    assert trainer._resuming("level_2") and not trainer._resuming("level_3")
    trainer.ckpt = Checkpoint(meta={"phase": "kit", "epoch": 0})
    assert trainer._past("level_4") and not trainer._past("kit")
    trainer.ckpt = Checkpoint(meta={"phase": "kit", "epoch": 1})
    assert trainer._past("kit")
    unified = Trainer(load_config(TINY), tmp_path / "u", unified=True)
    assert unified.order == ["unified", "done"]
