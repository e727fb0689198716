"""benchmarks/recipe_rerun.py: paired figures against stored recipes, and no overwrite."""

from __future__ import annotations

import json

import pytest
from helpers_benchmarks import load_benchmark


@pytest.fixture(scope="module")
def rerun():
    return load_benchmark("recipe_rerun")


def _eval(seed: int, routed: float, random: float, unified: float = 0.5) -> dict:
    row = {"routed": routed, "random": random, "unified": unified,
           "routed_minus_random": 100 * (routed - random),
           "routed_minus_unified": 100 * (routed - unified)}
    return {"seed": seed, "tasks": [dict(row, task="a"), dict(row, task="b")]}


def test_paired_differences_cancel_the_seed_shift(rerun):
    shifts = [-0.1, 0.0, 0.1]  # 10 points of seed noise shared by both recipes of a seed
    new = [_eval(s, 0.62 + d, 0.60 + d) for s, d in enumerate(shifts)]
    old = [_eval(s, 0.61 + d, 0.605 + d) for s, d in enumerate(shifts)]
    out = rerun.summary("new", new, {"old": old})
    assert out["recipes"]["new"]["routed"]["ci95"] > 10  # unpaired: the seed noise shows
    paired = out["paired"]["old"]
    assert paired["routed"]["mean"] == pytest.approx(1.0)
    assert paired["routed"]["ci95"] == pytest.approx(0.0, abs=1e-9)
    assert paired["routed_minus_random"]["mean"] == pytest.approx(2.0 - 0.5)


def test_refuses_a_name_that_would_overwrite_a_stored_record(rerun, tmp_path, capsys):
    for name in ("base", "deep2"):
        with pytest.raises(SystemExit, match="would overwrite"):
            rerun.main(["--out", str(tmp_path), "--recipe", "deep2", "--name", name,
                        "--against", "deep2"])
    with pytest.raises(SystemExit, match="has no teacher"):
        rerun.main(["--out", str(tmp_path), "--recipe", "deep2", "--name", "x"])
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_stored_rerun_is_reused_not_retrained(rerun, tmp_path, capsys):
    seed = tmp_path / "runs" / "seed0"
    (seed / "base").mkdir(parents=True)
    (seed / "base" / "teacher.safetensors").write_bytes(b"")
    options = {"task_set": "domains", "pool_limit": None, "task_limit": None, "pool": None,
               "random_routes": None}  # main()'s defaults
    key = rerun.record_key("deep2", 0, rerun.resolve_budget("cpu", **options))
    (seed / "recipe_x.json").write_text(json.dumps({"key": key, "result": _eval(0, 0.7, 0.6)}))
    (seed / "recipe_deep2.json").write_text(json.dumps({"key": key, "result": _eval(0, 0.65, 0.6)}))
    assert rerun.main(["--out", str(tmp_path), "--recipe", "deep2", "--name", "x",
                       "--against", "deep2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["paired"]["deep2"]["routed"]["mean"] == pytest.approx(5.0)
    assert sorted(p.name for p in seed.iterdir()) == ["base", "recipe_deep2.json", "recipe_x.json"]
    # a record made for another recipe (or budget) under that name is refused, not reused
    with pytest.raises(SystemExit, match="recipe_x.json was made for another recipe"):
        rerun.main(["--out", str(tmp_path), "--recipe", "coarse4", "--name", "x"])


def test_refuses_to_pair_with_an_evaluation_of_other_tasks(rerun, tmp_path):
    """A 2,000-image evaluation beside a whole-task-set rerun: refused before any training,
    naming the file and the field (an unkeyed record too)."""
    seed = tmp_path / "runs" / "seed0"
    seed.mkdir(parents=True)
    small = rerun.resolve_budget("cpu", task_set="domains", pool_limit=None, task_limit=2000,
                                 pool=None, random_routes=None)
    (seed / "recipe_deep2.json").write_text(json.dumps(
        {"key": rerun.record_key("deep2", 0, small), "result": _eval(0, 0.65, 0.6)}))
    with pytest.raises(SystemExit, match=r"recipe_deep2.json was evaluated with task_limit = "
                                         r"2000, this rerun with None"):
        rerun.main(["--out", str(tmp_path), "--recipe", "deep2", "--name", "x",
                    "--task-limit", "0", "--against", "deep2"])
    (seed / "recipe_old.json").write_text(json.dumps({"result": _eval(0, 0.65, 0.6)}))
    with pytest.raises(SystemExit, match="recipe_old.json has no key.budget"):
        rerun.main(["--out", str(tmp_path), "--recipe", "deep2", "--name", "x",
                    "--against", "old"])
    assert sorted(p.name for p in seed.iterdir()) == ["recipe_deep2.json", "recipe_old.json"]
