"""The paper-claim benchmark end to end on the minute budget: it runs and writes its table."""

import json

import pytest

from server.cli import main


@pytest.mark.slow
def test_bench_minute_budget_writes_results(tmp_path):
    out = tmp_path / "claim"
    assert main(["bench", "--budget", "minute", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["fashion-10", "footwear-3", "tops-4",
                                                     "digits-10"]
    for task in results["tasks"]:
        for model in ("unified", "sdr16", "sdr256"):
            assert 0.0 <= task[model]["probe"] <= 1.0
            assert 0.0 <= task[model]["finetune"] <= 1.0
        assert len(task["sdr256"]["route"]) == 4 and len(task["sdr16"]["route"]) == 2
        assert task["sdr256"]["regret_points"] >= 0.0
        # Best-on-test can only beat the candidate picked on the selection fold.
        assert task["sdr256"]["selected_regret_points"] <= task["sdr256"]["regret_points"]
    assert set(results["verdict"]) >= {"tasks_won", "mean_routed", "mean_unified", "holds"}
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 5 and "footwear-3" in table
    index = (out / "report" / "index.html").read_text()
    assert "accuracy.png" in index and (out / "report" / "accuracy.png").stat().st_size > 1000
    # A rerun reuses the three finished pre-training runs.
    assert main(["bench", "--budget", "minute", "--out", str(out)]) == 0
