"""The paper-claim benchmark: seed statistics and verdict on synthetic rows (fast), and the
minute budget end to end over two seeds, checked for shape and invariants (slow)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from sdr_edge.bench.budgets import BUDGETS, tasks
from sdr_edge.bench.paper_claim import (
    _claim_lines,
    aggregate,
    interval,
    markdown_table,
    pretrain_all,
    verdict,
)
from sdr_edge_server.cli import main

TASKS = ("a", "b", "c", "d")


def test_interval_is_the_student_t_interval_of_the_mean():
    s = interval([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    assert s["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t(0.975, df=2)
    assert s["lo"] < s["mean"] < s["hi"]
    one = interval([0.7])
    assert one["mean"] == 0.7 and one["std"] is None and one["ci95"] is None
    assert interval([None, 0.5, 0.7])["n"] == 2 and interval([])["mean"] is None


def _row(task: str, seed: int, unified: float, routed: float, random: float, ft: float,
         sel_regret: float = 0.0) -> dict:
    sdr = {"route": [0, 0, 0, 0], "score_rank": 1, "probe": routed, "finetune": ft,
           "teacher_probe": unified - 0.05, "random_probe": random, "lowest_probe": random,
           "random_routes": [[1, 1, 1, 1]], "regret_points": sel_regret + 1,
           "selected_regret_points": sel_regret,
           "routed_minus_unified_points": 100 * (routed - unified),
           "routed_minus_random_points": 100 * (routed - random),
           "finetune_minus_probe_points": 100 * (ft - routed)}
    return {"task": task, "seed": seed,
            "unified": {"probe": unified, "finetune": ft,
                        "finetune_minus_probe_points": 100 * (ft - unified)},
            "sdr16": dict(sdr), "sdr256": dict(sdr)}


def _seeds(gains: list[float], noise: list[float]) -> list[list[dict]]:
    """Per seed: every task's accuracies shift by a large seed noise, routed − random = gain."""
    return [[_row(t, s, 0.70 + n, 0.71 + n, 0.71 + n - g / 100, 0.75) for t in TASKS]
            for s, (g, n) in enumerate(zip(gains, noise, strict=True))]


def test_differences_are_paired_within_a_seed():
    agg = aggregate(_seeds([2.0, 2.0, 2.0], [-0.1, 0.0, 0.1]))
    a = agg["tasks"]["a"]["sdr256"]
    assert a["probe"]["ci95"] > 0.1  # 10 points of seed noise on each accuracy ...
    assert a["routed_minus_random_points"]["mean"] == pytest.approx(2.0)
    assert a["routed_minus_random_points"]["ci95"] == pytest.approx(0.0, abs=1e-9)  # ... cancel
    mot = agg["mean_over_tasks"]["sdr256"]["routed_minus_unified_points"]
    assert mot["mean"] == pytest.approx(1.0) and mot["n"] == 3
    assert agg["seeds"] == [0, 1, 2] and agg["task_names"] == list(TASKS)
    # Lists (routes) are not numbers and are not aggregated.
    assert "random_routes" not in a and "route" not in a


def test_verdict_uses_the_interval_not_the_mean():
    steady = verdict(aggregate(_seeds([2.0, 2.1, 1.9], [0.0, 0.01, -0.01])))
    assert steady["claims"]["routed_vs_random"]["holds"]
    assert steady["claims"]["routed_vs_unified"]["tasks_won"] == 4
    # Same mean gain (+2), but one seed loses: the interval reaches below 0.
    noisy = verdict(aggregate(_seeds([6.0, -4.0, 4.0], [0.0, 0.01, -0.01])))
    rr = noisy["claims"]["routed_vs_random"]
    assert rr["points"]["mean"] == pytest.approx(2.0) and rr["points"]["lo"] < 0
    assert not rr["holds"] and not noisy["holds"]
    # One seed: no interval, so the claim cannot hold however large the gain.
    single = verdict(aggregate(_seeds([5.0], [0.0])))
    assert single["claims"]["routed_vs_random"]["points"]["ci95"] is None
    assert not single["claims"]["routed_vs_random"]["holds"]
    assert not single["claims"]["finetune_vs_probe"]["holds"]  # std unknown with one seed


def test_verdict_regret_and_finetune_claims():
    rows = _seeds([2.0, 2.1, 1.9], [0.0, 0.0, 0.0])
    assert verdict(aggregate(rows))["holds"]  # fine-tune 75 > probe 71, std 0, regret 0
    rows[0][1] = _row("b", 0, 0.70, 0.71, 0.69, 0.75, sel_regret=4.0)
    v = verdict(aggregate(rows))
    assert v["claims"]["selection_regret"]["max_points"] == pytest.approx(4 / 3)
    assert not v["claims"]["selection_regret"]["holds"] and not v["holds"]
    rows = _seeds([2.0, 2.1, 1.9], [0.0, 0.0, 0.0])
    rows[1][2] = _row("c", 1, 0.70, 0.71, 0.69, 0.71)  # fine-tune std over seeds ~2.3 pts
    ft = verdict(aggregate(rows))["claims"]["finetune_vs_probe"]
    assert ft["finetune_std_points"]["c"] == pytest.approx(100 * np.std([0.75, 0.71, 0.75],
                                                                        ddof=1))
    assert not ft["holds"]


def test_selection_ceiling_is_paired_and_reported():
    rows = [[_row(t, s, 0.70, 0.71 + n, 0.69 + n, 0.75, sel_regret=1.0 + s) for t in TASKS]
            for s, n in enumerate([-0.1, 0.0, 0.1])]
    v = verdict(aggregate(rows))
    ceiling = v["selected_minus_random_points"]  # routed − random (2) + selection regret (1..3)
    assert ceiling["mean"] == pytest.approx(4.0) and ceiling["std"] == pytest.approx(1.0)
    assert any(line.startswith("- ceiling:") and "+4.0 ± " in line for line in _claim_lines(v))
    assert "selected_minus_random_points" not in rows[0][0]["sdr256"]  # inputs left as stored


def test_aggregate_refuses_seeds_with_different_tasks():
    rows = _seeds([2.0, 2.0], [0.0, 0.0])
    rows[1] = rows[1][:3]
    with pytest.raises(ValueError, match="same tasks"):
        aggregate(rows)


def test_markdown_table_shows_mean_and_interval():
    table = markdown_table(aggregate(_seeds([2.0, 2.1, 1.9], [0.0, 0.01, -0.01])))
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(TASKS) + 1 and lines[-1].startswith("| mean over tasks")
    assert "teacher (phase 0)" in lines[0] and "routed − random" in lines[0]
    assert "| +2.0 ± " in lines[-1]


def test_task_sets(monkeypatch):
    fashion = tasks(BUDGETS["minute"])
    assert [t.name for t in fashion] == ["fashion-10", "footwear-3", "tops-4", "digits-10"]
    with pytest.raises(ValueError, match="unknown task set 'nope'"):
        tasks(replace(BUDGETS["minute"], task_set="nope"))


def test_domains_task_set_lists_tasks():
    specs = tasks(replace(BUDGETS["minute"], task_set="domains"))
    assert specs and all(t.name and t.source for t in specs)
    assert all(t.limit == BUDGETS["minute"].task_limit for t in specs)


def test_cli_refuses_bad_seed_count(tmp_path, capsys):
    assert main(["bench", "--budget", "minute", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_minute_budget_two_seeds(tmp_path):
    out = tmp_path / "claim"
    assert main(["bench", "--budget", "minute", "--seeds", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and [p["seed"] for p in results["per_seed"]] == [0, 1]
    names = ["fashion-10", "footwear-3", "tops-4", "digits-10"]
    for per in results["per_seed"]:
        assert [t["task"] for t in per["tasks"]] == names
        for task in per["tasks"]:
            for model in ("unified", "sdr16", "sdr256"):
                assert 0.0 <= task[model]["probe"] <= 1.0
                assert 0.0 <= task[model]["finetune"] <= 1.0
            for model, digits in (("sdr16", 2), ("sdr256", 4)):
                m = task[model]
                assert len(m["route"]) == digits
                assert m["score_rank"] == 1  # routed is the top-scored route
                rand = [tuple(r) for r in m["random_routes"]]
                assert len(rand) == 2 == len(set(rand)) and tuple(m["route"]) not in rand
                assert m["lowest_score_rank"] == m["num_subnets"]
                assert m["random_probe"] == pytest.approx(np.mean(m["random_probes"]))
                assert m["routed_minus_random_points"] == pytest.approx(
                    100 * (m["probe"] - m["random_probe"]))
                assert m["routed_minus_unified_points"] == pytest.approx(
                    100 * (m["probe"] - task["unified"]["probe"]))
                assert m["regret_points"] >= 0.0
                # Best-on-test can only beat the candidate picked on the selection fold.
                assert m["selected_regret_points"] <= m["regret_points"]
    seed_runs = [p["runs"]["sdr256"] for p in results["per_seed"]]
    assert seed_runs[0] != seed_runs[1]
    agg = results["aggregate"]
    for name in names + [None]:
        entry = agg["mean_over_tasks"] if name is None else agg["tasks"][name]
        for model in ("sdr16", "sdr256"):
            for key in ("probe", "random_probe", "routed_minus_random_points",
                        "routed_minus_unified_points", "finetune", "teacher_probe"):
                s = entry[model][key]
                assert s["n"] == 2 and math.isfinite(s["ci95"])
                assert s["lo"] <= s["mean"] <= s["hi"]  # intervals contain the mean
    first = results["per_seed"][0]["tasks"][0]["sdr256"]["probe"]
    second = results["per_seed"][1]["tasks"][0]["sdr256"]["probe"]
    assert agg["tasks"]["fashion-10"]["sdr256"]["probe"]["mean"] == pytest.approx(
        (first + second) / 2)
    v = results["verdict"]
    assert v["seeds"] == 2 and set(v["claims"]) == {"routed_vs_random", "routed_vs_unified",
                                                     "selection_regret", "finetune_vs_probe"}
    assert v["holds"] == all(c["holds"] for c in v["claims"].values())
    table = (out / "results.md").read_text()
    assert table.count("| mean over tasks |") == 2 and table.count("\n| footwear-3 |") == 2
    assert " ± " in table and "teacher (phase 0)" in table
    index = (out / "report" / "index.html").read_text()
    assert "accuracy.png" in index and (out / "report" / "accuracy.png").stat().st_size > 1000
    assert (out / "report" / "route_tops-4_sdr256.png").is_file()
    # A rerun reuses the finished pre-training runs of both seeds (nothing is rewritten).
    manifests = sorted((out / "runs").glob("seed*/*/manifest.json"))
    assert len(manifests) == 6
    stamps = [p.stat().st_mtime_ns for p in manifests]
    for seed in (0, 1):
        pretrain_all(BUDGETS["minute"], out, seed)
    assert [p.stat().st_mtime_ns for p in manifests] == stamps
    # ... and the evaluation of each seed: a rerun (or a parallel run of one seed) aggregates
    # the stored rows without probing again; a different task size evaluates afresh.
    evaluations = [p.stat().st_mtime_ns for p in sorted((out / "runs").glob("seed*/evaluation.json"))]
    assert len(evaluations) == 2
    assert main(["bench", "--budget", "minute", "--seed", "1", "--seeds", "1",
                 "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["per_seed"] == results["per_seed"][1:]
    assert [p.stat().st_mtime_ns for p in sorted((out / "runs").glob("seed*/evaluation.json"))
            ] == evaluations
    # Unreadable: evaluated again, not a traceback. The file is read before its key is compared,
    # so a smaller task size (a cheaper evaluation) still goes through the unreadable path.
    (out / "runs" / "seed1" / "evaluation.json").write_text("{not json")
    assert main(["bench", "--budget", "minute", "--seed", "1", "--seeds", "1", "--task-limit",
                 "100", "--out", str(out)]) == 0
    key = json.loads((out / "runs" / "seed1" / "evaluation.json").read_text())["key"]
    assert key["seed"] == 1 and key["budget"]["task_limit"] == 100
