"""benchmarks/recipe_pairs.py: two stored recipe evaluations paired per seed and task."""

from __future__ import annotations

import json

import pytest
from helpers_benchmarks import load_benchmark


@pytest.fixture(scope="module")
def pairs():
    return load_benchmark("recipe_pairs")


def _write(root, name: str, seed: int, shift: float, gain: float) -> None:
    rows = [{"task": t, "routed": 0.6 + shift + gain + 0.01 * i, "random": 0.6 + shift,
             "unified": 0.6 + shift, "routed_minus_random": 100 * (gain + 0.01 * i),
             "routed_minus_unified": 100 * (gain + 0.01 * i)} for i, t in enumerate("abc")]
    path = root / "runs" / f"seed{seed}" / f"recipe_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": {}, "result": {
        "tasks": rows, "expert_spread": [0.1, 0.2], "domain_purity": None}}))


def test_pairs_cancel_the_seed_shift_and_count_the_pairs(pairs, tmp_path, capsys):
    for seed, shift in enumerate([-0.1, 0.0, 0.1]):  # 10 points of seed noise in both recipes
        _write(tmp_path, "new", seed, shift, 0.02)
        _write(tmp_path, "old", seed, shift, 0.0)
    assert pairs.main(["--out", str(tmp_path), "--seeds", "0", "1", "2", "--a", "new",
                       "--b", "old"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new"]["routed"]["ci95"] > 10  # unpaired, the seed noise shows
    d = out["new - old"]["routed"]
    assert d["over_seeds"]["mean"] == pytest.approx(2.0)
    assert d["over_seeds"]["ci95"] == pytest.approx(0.0, abs=1e-9)
    assert (d["pairs"], d["pairs_above"]) == (9, 9)
    assert out["new"]["tasks_routed_ge_unified_mean"] == 3
    assert out["old"]["routed_minus_random"]["mean"] == pytest.approx(1.0)


def test_a_missing_evaluation_is_named(pairs, tmp_path):
    _write(tmp_path, "new", 0, 0.0, 0.0)
    with pytest.raises(SystemExit, match="no stored evaluation .*recipe_old.json"):
        pairs.main(["--out", str(tmp_path), "--a", "new", "--b", "old"])
