"""benchmarks/label_budget.py: label picks among the signature's top M, exact controls, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_benchmarks import load_benchmark
from helpers_rundir import shared_tiny_run

from sdr_edge.bench.budgets import TaskSpec


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory.getbasetemp(), clustered=True)


def test_pick_is_the_best_scored_of_the_top_m_against_the_other_subnets() -> None:
    bench = load_benchmark("label_budget")
    acc = np.array([0.5, 0.6, 0.7, 0.8])  # signature order: index 0 is the routed sub-net
    # the selection fold picked sub-net 2 (0.7): picking 1 (0.6) is 10 points behind it
    one = bench.pick_figures(acc, np.array([[0.0, 1.0, 0.0, 0.0]]), 4, selected=2)
    assert one["minus_random_points"] == pytest.approx(100 * (0.6 - np.mean([0.5, 0.7, 0.8])))
    assert one["regret_points"] == pytest.approx(20.0) and one["probe_points"] == pytest.approx(60.0)
    assert one["selection_regret_points"] == pytest.approx(10.0)
    # better than the selection fold's pick: a negative regret by the selection fold
    assert bench.pick_figures(acc, np.array([[0, 0, 0, 1.0]]), 4, 2)[
        "selection_regret_points"] == pytest.approx(-10.0)
    # the top M bounds the choice; ties keep the better-routed candidate
    assert bench.pick_figures(acc, np.array([[0.0, 0.0, 0.0, 9.0]]), 2, 2)[
        "regret_points"] == pytest.approx(30.0)
    # two draws: the figures are their mean
    two = bench.pick_figures(acc, np.array([[0, 0, 0, 1.0], [1.0, 0, 0, 0]]), 4, 2)
    assert two["regret_points"] == pytest.approx((0.0 + 30.0) / 2)


def test_label_budget_on_a_tiny_run(tiny_run, tmp_path, capsys) -> None:
    bench = load_benchmark("label_budget")
    task = TaskSpec("digits", "builtin:digits", 300)
    # the run's own phase-0 teacher stands in for a unified run: both load teacher.safetensors
    row = bench.evaluate(tiny_run, task, 0, [3, 5], [1, 2, 4], 2, tmp_path / "cache",
                         unified=tiny_run)
    assert row["num_subnets"] == 4 and row["classes"] == 10
    acc = np.array(list(row["accuracy"].values()))
    routed = acc[0]  # accuracy is stored in signature order
    assert row["signature"]["minus_random_points"] == pytest.approx(
        100 * (routed - np.delete(acc, 0).mean()))
    assert 0.1 < row["unified_probe"] <= 1.0
    # the selection fold's pick is one of the sub-nets; the signature's regret against it
    assert row["selected_route"] in row["accuracy"]
    assert row["signature"]["selection_regret_points"] == pytest.approx(
        100 * (row["accuracy"][row["selected_route"]] - routed))
    assert row["signature"]["minus_unified_points"] == pytest.approx(
        100 * (routed - row["unified_probe"]))
    for method in ("logme", "knn", "probe"):
        # a top M of one is the signature route, whatever the labels say
        assert row["options"][f"{method}/5/1"]["minus_random_points"] == pytest.approx(
            row["signature"]["minus_random_points"])
        assert all(row["options"][f"{method}/{n}/4"]["regret_points"] >= 0 for n in (3, 5))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = bench.evaluate(tiny_run, task, 0, [3, 5], [1, 2, 4], 2, tmp_path / "cache",
                           unified=tiny_run)
    assert again["accuracy"] == row["accuracy"]  # read back from the cache: same figures
    assert {k: o["minus_random_points"] for k, o in again["options"].items()} == {
        k: o["minus_random_points"] for k, o in row["options"].items()}
    # a damaged cache entry is reported and recomputed, not trusted and not fatal
    entry = next((tmp_path / "cache").glob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:100])
    capsys.readouterr()
    third = bench.evaluate(tiny_run, task, 0, [3, 5], [1, 2, 4], 2, tmp_path / "cache")
    assert "unreadable feature cache, recomputed" in capsys.readouterr().err
    assert third["accuracy"] == pytest.approx(row["accuracy"])
    assert bench.read_cache(entry, bench.run_sha256(tiny_run)) is not None  # rewritten whole
    assert bench.read_cache(entry, "another run") is None  # a retrained run is a new key
    summary = bench.summarize([row, {**row, "seed": 1}])
    assert summary["options"]["probe/5/4"]["bytes"] == 4 * row["bundle_bytes"]
    assert summary["options"]["knn/3/2"]["minus_random_points"]["pairs"]["n"] == 2
    assert "| probe | 5 | 4 |" in bench.table(summary)
    # seeds run as separate processes, then --merge summarises their rows
    one = tmp_path / "seed0.json"
    one.write_text(json.dumps({"rows": [row]}))
    assert bench.main(["--merge", str(one), str(one), "--out", str(tmp_path / "all.json")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert (tmp_path / "all.png").stat().st_size > 10_000  # the plot beside the JSON
    assert len(merged["rows"]) == 2 and merged["summary"]["options"]["probe/5/4"][
        "minus_random_points"]["pairs"]["n"] == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SystemExit, match="broken.json: not an output of label_budget.py"):
        bench.main(["--merge", str(broken), "--out", str(tmp_path / "x.json")])
