"""Budget-pruned federation: the ServerApp cuts the routed sub-net to a MACs target before
FedAvg, nodes rebuild the pruned widths from the weights they receive, and the signed result
exports to ONNX like any bundle. In-process (LocalGrid) here; the same run on the Deployment
Engine with real SuperNodes shares the end-to-end fleet (test_federation_e2e.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from helpers_flower import digits_node
from helpers_pruned import LIMIT, RATIO, check_pruned_bundle, run_config, unpruned

from sdr_edge.federated.client_app import app
from sdr_edge.federated.config import FederationConfig, FederationConfigError
from sdr_edge.federated.node_data import NodeDataConfig, load_node_data
from sdr_edge.federated.records import describe_model, model_from_message, model_to_arrays
from sdr_edge.federated.server_flow import run_federation
from sdr_edge.federated.testing import LocalGrid, server_identity
from sdr_edge.pruning import channel_widths, example_input
from sdr_edge.training.finetune import evaluate_local


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here trains: one torch thread (conftest)."""


def test_local_grid_fine_tunes_the_pruned_subnet_and_it_exports(assets, tmp_path, capsys):
    from sdr_edge.inference.runners import OrtRunner
    from sdr_edge_export.cli import main as export_main

    out = tmp_path / "out"
    cfg = FederationConfig.from_run_config(run_config(assets, out))
    nodes = [digits_node(i, 2, assets["kit_dir"], limit=LIMIT) for i in range(2)]
    with server_identity():
        summary = run_federation(LocalGrid(app, nodes), cfg)
    rounds = {r["round"]: r for r in json.loads((out / "summary.json").read_text())["rounds"]}
    assert rounds[1]["train_ok"] == 2 and not rounds[1].get("train_refused")
    # it learns (round 0: the pruned sub-net with a fresh head; measured 0.12 -> 0.21)
    assert rounds[1]["eval-accuracy"] > rounds[0]["eval-accuracy"] + 0.04, rounds
    bundle, pruned = check_pruned_bundle(assets, out)
    assert summary["pruned"]["macs_after"] == pruned["macs_after"]
    # the signed pruned model is the aggregated one: it scores what the nodes reported
    correct = total = 0
    for node in nodes:
        data = load_node_data(NodeDataConfig.from_node_config(node), 16, 1)
        res = evaluate_local(bundle.model, data.test.images, data.test.labels, bundle.input_spec)
        correct, total = correct + res.accuracy * res.num_examples, total + res.num_examples
    assert correct / total == pytest.approx(rounds[1]["eval-accuracy"], abs=1e-6)

    onnx_path = tmp_path / "pruned.onnx"
    rc = export_main(["onnx", "--bundle", str(out / "bundle"), "--pubkey", str(assets["pub"]),
                      "--out", str(onnx_path), "--eval-source", "builtin:digits",
                      "--eval-limit", "100", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    x = torch.randn(4, *example_input(bundle.input_spec).shape[1:])
    with torch.no_grad():
        ref = bundle.model(x).numpy()
    assert np.abs(OrtRunner(onnx_path).run(x.numpy()) - ref).max() <= 1e-4


def test_nodes_build_the_widths_they_receive_and_refuse_weights_that_do_not_fit(assets):
    from sdr_edge.pruning import prune_to_macs

    full, spec = unpruned(assets)
    pruned = prune_to_macs(full, spec, RATIO, progress=False).model
    config = describe_model(pruned, spec, (1, 2, 0, 3))  # the architecture JSON: unpruned layout
    model, _ = model_from_message(config, model_to_arrays(pruned))
    assert channel_widths(model) == channel_widths(pruned) != channel_widths(full)
    x = torch.randn(2, *example_input(spec).shape[1:])
    with torch.no_grad():
        assert torch.equal(model.eval()(x), pruned(x))
    arrays = dict(model_to_arrays(pruned))
    key = next(k for k in arrays if k.endswith("bn1.running_mean"))
    arrays[key] = Array(np.zeros(arrays[key].shape[0] + 1, np.float32))
    with pytest.raises(ValueError, match="has shape"):
        model_from_message(config, ArrayRecord(arrays))


@pytest.mark.parametrize("ratio", [0.0, 1.5, "half"])
def test_prune_macs_ratio_is_checked_by_name(ratio):
    with pytest.raises(FederationConfigError, match="prune-macs-ratio"):
        FederationConfig.from_run_config({"run-dir": "r", "signing-key": "k",
                                          "prune-macs-ratio": ratio})
