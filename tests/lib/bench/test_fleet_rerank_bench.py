"""benchmarks/fleet_rerank.py: the fleet's re-rank replayed on node partitions, exact controls."""

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


def test_fleet_rerank_on_a_tiny_run(tiny_run, tmp_path, capsys) -> None:
    bench = load_benchmark("fleet_rerank")
    task = TaskSpec("digits", "builtin:digits", 300)
    row = bench.evaluate(tiny_run, task, 0, [1, 3, 10], [None, 0.05], 2, 4,
                         ["logme", "knn", "consensus", "consensus-fleet"], tmp_path / "cache",
                         unified=None)
    assert row["num_subnets"] == 4 and row["classes"] == 10
    for method in ("logme", "knn", "consensus"):
        # one node holding the whole split is the pooled device, whatever the partition rule
        for alpha in ("iid", "0.05"):
            one = row["fleet"][f"{method}/1/{alpha}"]
            assert one["agrees_with_pooled"] == 1.0 and one["nodes_skipped"] == 0
            assert one["minus_random_points"] == pytest.approx(
                row["pooled"][method]["minus_random_points"])
        assert all(f["regret_points"] >= 0 for f in row["fleet"].values())
        # regret by the selection fold: the same pick, against the selection fold's sub-net
        for f in [row["pooled"][method], *row["fleet"].values()]:
            assert f["selection_regret_points"] - f["regret_points"] == pytest.approx(
                row["signature"]["selection_regret_points"] - row["signature"]["regret_points"])
    # label-free: a node's labels do not matter, only its image count (more than 16)
    assert row["fleet"]["consensus/3/iid"]["nodes_skipped"] == 0  # 70 images a node
    assert row["fleet"]["consensus/10/iid"]["nodes_skipped"] == 0  # 21
    assert row["fleet"]["consensus/10/0.05"]["nodes_skipped"] > 0  # skewed: some hold fewer
    # the fleet's joint consensus counts every node, however few images it holds; on one
    # device it is the consensus
    assert row["fleet"]["consensus-fleet/10/0.05"]["nodes_skipped"] == 0
    assert row["pooled"]["consensus-fleet"]["minus_random_points"] == pytest.approx(
        row["pooled"]["consensus"]["minus_random_points"])
    assert 0.0 <= row["fleet"]["consensus-fleet/10/iid"]["agrees_with_pooled"] <= 1.0
    # strong label skew over many nodes leaves some nodes with one class: they cannot score
    assert row["fleet"]["logme/10/0.05"]["nodes_skipped"] > 0
    assert row["fleet"]["logme/3/iid"]["nodes_skipped"] == 0
    summary = bench.summarize([row, {**row, "seed": 1}])
    assert summary["fleet"]["knn/3/iid"]["minus_random_points"]["pairs"]["n"] == 2
    text = bench.table(summary)
    assert "| logme, 10 nodes, Dirichlet 0.05 |" in text and " / " in text and "| signature (label-free) |" in text
    one = tmp_path / "seed0.json"
    one.write_text(json.dumps({"rows": [row]}))
    assert bench.main(["--merge", str(one), str(one), "--out", str(tmp_path / "all.json")]) == 0
    assert len(json.loads((tmp_path / "all.json").read_text())["rows"]) == 2
    (tmp_path / "broken.json").write_text("[]")
    with pytest.raises(SystemExit, match="broken.json: not an output of fleet_rerank.py"):
        bench.main(["--merge", str(tmp_path / "broken.json"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--run", str(tiny_run), "--alphas", "iid,-1", "--out", str(tmp_path / "y")])
    assert "Dirichlet alpha must be > 0" in capsys.readouterr().err
    assert np.isfinite(row["signature"]["minus_random_points"])
    with pytest.raises(SystemExit, match="digits: 500 nodes, Dirichlet 0.05: cannot split 210 images into 500"):
        bench.evaluate(tiny_run, task, 0, [500], [0.05], 1, 4, ["logme"], tmp_path / "cache",
                       unified=None)
