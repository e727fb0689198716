"""route-eval on a tiny run: regret, rank correlation, candidate selection, CLI output and errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from tiny_run import make_tiny_run

from sdr_edge.routing.evaluate import evaluate_routing, parse_candidates
from sdr_edge.routing.probe import linear_probe_accuracy


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run") / "run")[0]


def test_evaluate_all_candidates(tiny_run):
    res = evaluate_routing(tiny_run, "builtin:digits", "all", image_limit=400, progress=False)
    assert res["num_candidates"] == res["num_subnets"] == 4
    assert res["train_images"] + res["test_images"] == 400
    rows = res["candidates"]
    assert [r["score_rank"] for r in rows] == [1, 2, 3, 4]
    routed = [r for r in rows if r["routed"]]
    assert len(routed) == 1 and routed[0]["route"] == res["routed_route"]
    assert routed[0]["score_rank"] == 1  # the majority route is the top-scoring one
    best = max(r["probe_accuracy"] for r in rows)
    assert res["best_probe_accuracy"] == best
    assert res["regret_points"] == pytest.approx(100 * (best - res["routed_probe_accuracy"]))
    assert res["regret_points"] >= 0
    assert res["spearman_score_vs_probe"] is None or -1 <= res["spearman_score_vs_probe"] <= 1
    # frozen features of random-init nets still separate digits far above chance (10%)
    assert min(r["probe_accuracy"] for r in rows) > 0.4
    assert min(r["knn_accuracy"] for r in rows) > 0.4
    assert res["teacher_probe_accuracy"] > 0.4
    json.dumps(res)  # JSON-able as is


def test_top1_is_the_routed_subnet(tiny_run):
    res = evaluate_routing(tiny_run, "builtin:digits", "top1", image_limit=200,
                           include_teacher=False, progress=False)
    assert res["num_candidates"] == 1
    assert res["best_route"] == res["routed_route"] and res["regret_points"] == 0.0
    assert res["spearman_score_vs_probe"] is None


def test_parse_candidates():
    assert parse_candidates("all") is None
    assert parse_candidates("top8") == 8 and parse_candidates("3") == 3
    for bad in ("top0", "best", "top-1"):
        with pytest.raises(ValueError):
            parse_candidates(bad)


def test_linear_probe_learns_separable_features():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    f = rng.standard_normal((300, 8)) + 3 * np.eye(8)[y]
    assert linear_probe_accuracy(f[:200], y[:200], f[200:], y[200:]) > 0.9


def test_cli_writes_json_and_plot(tiny_run, tmp_path, capsys):
    from server.cli import main

    out = tmp_path / "eval"
    rc = main(["route-eval", "--run", str(tiny_run), "--task", "builtin:digits",
               "--candidates", "top2", "--image-limit", "200", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_candidates"] == 2
    saved = json.loads((out / "route_eval.json").read_text())
    assert saved["routed_route"] == summary["routed_route"]
    png = (out / "route_eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_errors(tiny_run, tmp_path, capsys):
    from server.cli import main

    unlabeled = tmp_path / "flat"
    unlabeled.mkdir()
    for i in range(6):
        cv2.imwrite(str(unlabeled / f"{i}.png"), np.full((16, 16), 40 * i, np.uint8))
    args = ["route-eval", "--run", str(tiny_run), "--out", str(tmp_path / "o")]
    assert main([*args, "--task", str(unlabeled)]) == 2
    assert "has no labels" in capsys.readouterr().err
    assert main([*args, "--task", "builtin:digits", "--candidates", "best"]) == 2
    assert "topM" in capsys.readouterr().err
    assert main(["route-eval", "--run", str(tmp_path / "none"), "--task", "builtin:digits",
                 "--out", str(tmp_path / "o")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["route-eval", "--run", str(tmp_path), "--task", "builtin:digits",
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing sdrnet.safetensors" in capsys.readouterr().err
