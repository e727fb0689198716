"""benchmarks/finetune_recipe.py: seeds, records, and the spread split by source."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_benchmarks import load_benchmark
from helpers_rundir import build_tiny_run


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("finetune_recipe")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # main() sets its --threads


def _rec(run: str, split: int, seed: int, method: str, acc: float) -> dict:
    return {"run": run, "task": "t", "split_seed": split, "seed": seed, "test_images": 100,
            "method": method, "accuracy": acc}


def test_summary_separates_finetune_seed_pretraining_and_split_spread(bench):
    records = [
        # run a, split 0: fine-tune seeds 0..2 -> std 1 point; the probe is fixed
        *[_rec("a", 0, s, "new", v) for s, v in enumerate((0.90, 0.91, 0.92))],
        *[_rec("a", 0, s, "probe", 0.80) for s in range(3)],
        # run b at the same split and seed 0: pre-training spread |0.90 - 0.86| / sqrt 2
        _rec("b", 0, 0, "new", 0.86), _rec("b", 0, 0, "probe", 0.80),
        # run a, split seeds 1, 2 with fine-tune seed = split seed (and a duplicate of seed 0)
        _rec("a", 1, 1, "new", 0.94), _rec("a", 2, 2, "new", 0.98),
        _rec("a", 0, 0, "new", 0.90),
        *[_rec("a", s, s, "probe", 0.80) for s in (1, 2)],
    ]
    row = bench.summarize(records)["t"]["new"]
    assert row["mean_common"] == row["mean"] == pytest.approx(91.83)  # probe ran every cell
    assert row["n"] == 6  # the duplicate counts once
    assert row["finetune_seed_std"] == pytest.approx(1.0) and row["finetune_seed_groups"] == 1
    assert row["pretrain_std"] == pytest.approx(2.83) and row["pretrain_groups"] == 1
    assert row["split_std"] == pytest.approx(4.0) and row["split_groups"] == 1  # 90, 94, 98
    assert row["minus_probe"] == pytest.approx(100 * (0.90 + 0.91 + 0.92 + 0.86 + 0.94 + 0.98)
                                               / 6 - 80, abs=0.01)
    verdict = bench.verdict(bench.summarize(records))["new"]
    assert verdict["max_finetune_seed_std"] == pytest.approx(1.0) and verdict["holds"]
    assert verdict["pooled_finetune_seed_std"] == pytest.approx(1.0) and verdict["tasks"] == 1
    # a second recipe on run a's fixed split only: the table compares on those three cells
    records += [_rec("a", 0, s, "new-warmup", v) for s, v in enumerate((0.80, 0.81, 0.82))]
    table = bench.markdown(bench.summarize(records)).splitlines()
    assert table[2:] == ["| t | new | 80.0 | 91.0 ± 1.0 | +11.0 | 2.8 | 4.0 |",
                         "| t | new-warmup | 80.0 | 81.0 ± 1.0 | +1.0 | – | – |"]


def test_runs_merge_across_invocations_and_reproduce_per_seed(bench, tmp_path, one_thread,
                                                              capsys):
    runs = [build_tiny_run(tmp_path / f"run{s}", seed=s, with_kit=False) for s in (0, 1)]
    common = ["--task", "digits=builtin:digits", "--limit", "80", "--recipes", "new",
              "--threads", "1"]
    fixed, split = tmp_path / "fixed.json", tmp_path / "split.json"
    assert bench.main([*common, "--run-dir", str(runs[0]), "--run-dir", str(runs[1]),
                       "--seeds", "2", "--out", str(fixed)]) == 0
    assert bench.main([*common, "--run-dir", str(runs[0]), "--seeds", "2", "--vary-split",
                       "--out", str(split)]) == 0
    first, second = (json.loads(p.read_text())["records"] for p in (fixed, split))
    assert len(first) == 2 * 2 * 2 and len(second) == 2 * 2  # (probe + recipe) per seed
    same = [r for r in first if r["run"] == str(runs[0]) and r["seed"] == 0]
    again = [r for r in second if r["seed"] == 0]
    assert [r["accuracy"] for r in same] == [r["accuracy"] for r in again]  # deterministic
    assert {r["split_seed"] for r in second} == {0, 1}
    capsys.readouterr()
    assert bench.main(["--summarize", str(fixed), str(split)]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text[:text.rindex("}") + 1])["summary"]["digits"]["new"]
    assert summary["n"] == 5  # 4 + 2, one duplicate
    assert (summary["finetune_seed_groups"], summary["pretrain_groups"],
            summary["split_groups"]) == (2, 2, 1)  # (run, split) pairs, (split, seed) pairs, runs
    assert "| digits | new |" in text


def test_summarize_names_a_file_without_records(bench, tmp_path):
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"tasks": {}}))
    with pytest.raises(SystemExit, match="old.json: no 'records' list"):
        bench.main(["--summarize", str(bad)])


def test_domain_task_set_and_unknown_recipe(bench, capsys):
    args = bench.parse_args(["--run-dir", "x", "--task-set", "domains"])
    assert [name for name, _ in bench.task_list(args)][0] == "footwear-3"
    assert len(bench.task_list(args)) == 6
    with pytest.raises(SystemExit):
        bench.parse_args(["--run-dir", "x", "--recipes", "new,fancy"])
    assert "unknown ['fancy']" in capsys.readouterr().err
