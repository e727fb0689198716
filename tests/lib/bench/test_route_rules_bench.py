"""benchmarks/route_rules.py on a tiny run: every rule's route probed, controls exact, summary."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_benchmarks import load_benchmark
from helpers_rundir import shared_tiny_run

from sdr_edge.bench.budgets import TaskSpec
from sdr_edge.routing.evaluate import evaluate_routing


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory.getbasetemp(), clustered=True)


def test_rules_on_every_subnet_match_route_eval(tiny_run):
    bench = load_benchmark("route_rules")
    task = TaskSpec("digits", "builtin:digits", 300)
    row = bench.evaluate(tiny_run, task, seed=0, all_up_to=64, random_routes=2)
    assert row["exhaustive"] and row["probed"] == row["num_subnets"] == 4
    # the marginal rule is the signature route that route-eval reports on the same split
    ref = evaluate_routing(tiny_run, "builtin:digits", "all", image_limit=300, seed=0,
                           include_teacher=False, progress=False)
    marginal = row["rules"]["marginal"]
    assert marginal["route"] == ref["routed_route"]
    assert marginal["probe"] == pytest.approx(ref["routed_probe_accuracy"])
    acc = row["accuracy"]
    for rule in row["rules"].values():  # random = the mean over the other 3 sub-nets, exactly
        key = "-".join(map(str, rule["route"]))
        others = [a for k, a in acc.items() if k != key]
        assert rule["random_mean"] == pytest.approx(np.mean(others))
        assert rule["minus_random_points"] == pytest.approx(100 * (acc[key] - np.mean(others)))
    summary = bench.summarize([row, {**row, "seed": 1}])
    assert summary["marginal"]["same_route_as_marginal"] == 2
    assert summary["joint"]["pairs"]["minus_random_points"]["n"] == 2
