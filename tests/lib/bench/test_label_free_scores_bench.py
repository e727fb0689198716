"""benchmarks/label_free_scores.py: label-free picks from label_budget's feature cache."""

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


def test_label_free_scores_on_a_cached_tiny_run(tiny_run, tmp_path) -> None:
    budget = load_benchmark("label_budget")
    bench = load_benchmark("label_free_scores")
    data = budget.subnet_features(tiny_run, TaskSpec("digits", "builtin:digits", 300), 0,
                                  tmp_path / "cache")
    out = tmp_path / "free.json"
    assert bench.main(["--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    acc = data["test_accuracy"]
    assert row["task"] == "digits" and row["seed"] == 0 and row["classes"] == 10
    for name, o in row["options"].items():
        # every pick is one of the sub-nets: its figures are one of theirs
        picks = [budget.pick_points(acc, k, budget.selection_pick(data, 0)) for k in range(len(acc))]
        assert any(o["minus_random_points"] == pytest.approx(p["minus_random_points"])
                   for p in picks), name
        assert o["regret_points"] >= 0
    assert row["signature"]["regret_points"] == pytest.approx(100 * (acc.max() - acc[0]))
    assert set(result["summary"]["options"]) == set(row["options"])
    assert np.isfinite(result["load_average"]).all()
    with pytest.raises(SystemExit):
        bench.main(["--cache", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json")])
