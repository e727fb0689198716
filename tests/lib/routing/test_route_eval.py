"""route-eval on a tiny run: regret, rank correlation, candidate selection, CLI output and errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from helpers_rundir import shared_tiny_run

from sdr_edge.routing.evaluate import (
    evaluate_routing,
    parse_candidates,
    plot_routing,
    random_control_routes,
)
from sdr_edge.routing.probe import linear_probe_accuracy


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory.getbasetemp(), clustered=True)


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


def test_controls_random_and_lowest_routes(tiny_run):
    res = evaluate_routing(tiny_run, "builtin:digits", "top1", image_limit=200, random_routes=2,
                           include_teacher=False, progress=False)
    routed = res["routed_route"]
    assert res["routed_score_rank"] == 1  # the routed sub-net is the top-scored route
    rand = res["random_routes"]
    assert len(rand) == 2 and rand[0] != rand[1] and routed not in rand
    assert res["lowest_score_rank"] == res["num_subnets"] == 4
    assert res["lowest_route"] != routed
    by_route = {tuple(c["route"]): c for c in res["controls"]}
    assert res["random_probe_accuracies"] == [by_route[tuple(r)]["probe_accuracy"] for r in rand]
    assert res["random_probe_accuracy"] == pytest.approx(np.mean(res["random_probe_accuracies"]))
    assert res["routed_minus_random_points"] == pytest.approx(
        100 * (res["routed_probe_accuracy"] - res["random_probe_accuracy"]))
    assert res["lowest_probe_accuracy"] == by_route[tuple(res["lowest_route"])]["probe_accuracy"]
    # Controls are not candidates: the regret over the top-1 candidate stays 0.
    assert res["num_candidates"] == 1 and res["regret_points"] == 0.0
    again = evaluate_routing(tiny_run, "builtin:digits", "top1", image_limit=200,
                             random_routes=2, include_teacher=False, progress=False)
    assert again["random_routes"] == rand  # seeded


def test_random_control_routes_are_distinct_seeded_and_exclude_the_routed_one():
    branching, routed = (4, 4, 4, 4), (1, 2, 3, 0)
    draws = [random_control_routes(branching, routed, 8, seed) for seed in range(3)]
    for d in draws:
        assert len(d) == len(set(d)) == 8 and routed not in d
    assert draws[0] == random_control_routes(branching, routed, 8, 0)
    assert draws[0] != draws[1] != draws[2]
    # More than the other sub-nets: every other route, once.
    assert sorted(random_control_routes((2, 2), (0, 1), 10, 0)) == [(0, 0), (1, 0), (1, 1)]
    assert random_control_routes((2, 2), (0, 1), 0, 0) == []
    with pytest.raises(ValueError, match=">= 0"):
        random_control_routes((2, 2), (0, 1), -1, 0)


def test_plot_labels_each_reference_for_what_it_is(tiny_run, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    res = evaluate_routing(tiny_run, "builtin:digits", "all", image_limit=200, random_routes=2,
                           progress=False)
    labels: list[str] = []
    real_savefig = Figure.savefig

    def capture(fig, *args, **kwargs):
        labels.extend(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    plot_routing(res, tmp_path / "p.png", unified_probe_accuracy=0.5)
    assert "teacher (phase 0)" in labels and "unified (own run)" in labels
    assert "random routes (2)" in labels
    assert not any("teacher (unified)" in t for t in labels)


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
    from sdr_edge_server.cli import main

    out = tmp_path / "eval"
    rc = main(["route-eval", "--run", str(tiny_run), "--task", "builtin:digits",
               "--candidates", "top2", "--image-limit", "200", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_candidates"] == 2
    # The default 8 random controls are capped at the 3 other sub-nets of this K = 4 run.
    assert summary["routed_minus_random_points"] is not None
    saved = json.loads((out / "route_eval.json").read_text())
    assert saved["routed_route"] == summary["routed_route"]
    assert len(saved["random_routes"]) == 3
    png = (out / "route_eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_errors(tiny_run, tmp_path, capsys):
    from sdr_edge_server.cli import main

    unlabeled = tmp_path / "flat"
    unlabeled.mkdir()
    for i in range(6):
        cv2.imwrite(str(unlabeled / f"{i}.png"), np.full((16, 16), 40 * i, np.uint8))
    args = ["route-eval", "--run", str(tiny_run), "--out", str(tmp_path / "o")]
    assert main([*args, "--task", str(unlabeled)]) == 2
    assert "has no labels" in capsys.readouterr().err
    assert main([*args, "--task", "builtin:digits", "--candidates", "best"]) == 2
    assert "topM" in capsys.readouterr().err
    assert main([*args, "--task", "builtin:digits", "--random-routes", "-1"]) == 2
    assert "--random-routes must be >= 0" in capsys.readouterr().err
    assert main([*args, "--task", "builtin:digits", "--candidates", "best"]) == 2
    assert "topM" in capsys.readouterr().err
    assert main(["route-eval", "--run", str(tmp_path / "none"), "--task", "builtin:digits",
                 "--out", str(tmp_path / "o")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["route-eval", "--run", str(tmp_path), "--task", "builtin:digits",
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing sdrnet.safetensors" in capsys.readouterr().err
