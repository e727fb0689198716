"""The ClientApp's handlers called directly on tiny data, partitions, and the server flow in-process."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from helpers_flower import digits_node

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.run_dir import load_sdrnet
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.federated.client_app import NODE_DATA_ERROR, app
from sdr_edge.federated.config import FederationConfig, FederationConfigError
from sdr_edge.federated.partition import dirichlet_partition, iid_partition, train_test_split
from sdr_edge.federated.records import describe_model, model_to_arrays
from sdr_edge.federated.server_flow import run_federation
from sdr_edge.federated.strategy import FederationError
from sdr_edge.federated.testing import LocalGrid, server_identity
from sdr_edge.models.classifier import SubnetModel
from sdr_edge.routing.signature import Signature

ROUTE = (1, 2, 0, 3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here trains: one torch thread (conftest)."""


@pytest.fixture(scope="module")
def start(assets):
    """The routed sub-net with a fresh 10-class head, as the server sends it."""
    net, spec = load_sdrnet(assets["run_dir"])
    torch.manual_seed(0)
    model = SubnetModel(net.extract(ROUTE), 10).eval()
    return model, spec


def call(kind: str, content: RecordDict, node_config: dict) -> Message:
    """Deliver one message to the ClientApp the way a SuperNode does."""
    with server_identity():
        msg = Message(content, dst_node_id=7, message_type=kind)
    return app(msg, Context(1, 7, node_config, RecordDict(), {}))


def model_content(model, spec, **config) -> RecordDict:
    return RecordDict({"arrays": model_to_arrays(model),
                       "config": ConfigRecord({**describe_model(model, spec, ROUTE), **config})})


def state_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy()) for k, v in record.items()}


def write_images(folder, n_per_class=3, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n_per_class):
            cv2.imwrite(str(folder / c / f"{i}.png"), rng.integers(0, 255, (20, 20), np.uint8))


# -- query -----------------------------------------------------------------------------------

def test_query_returns_the_nodes_signature(assets):
    node = digits_node(0, 2, assets["kit_dir"])
    reply = call(MessageType.QUERY, RecordDict({"config": ConfigRecord({})}), node)
    assert not reply.has_error(), reply.error
    sig = Signature.from_json(reply.content["signature"]["signature"], branching=(4, 4, 4, 4))
    assert sig.count == 899  # partition 0 of 1,797 digits: both splits are described
    assert reply.content["metrics"]["num-examples"] == 899
    assert reply.content["metrics"]["num-classes"] == 10
    assert json.loads(reply.content["signature"]["label-names"]) == [str(i) for i in range(10)]


def test_query_on_empty_folder_is_a_clear_error_reply(assets, tmp_path):
    (tmp_path / "empty").mkdir()
    reply = call(MessageType.QUERY, RecordDict({"config": ConfigRecord({})}),
                 {"data": str(tmp_path / "empty"), "kit-dir": str(assets["kit_dir"])})
    assert reply.has_error()
    assert reply.error.code == NODE_DATA_ERROR
    assert "no readable image" in reply.error.reason


def test_query_on_unreadable_files_names_them(assets, tmp_path):
    bad = tmp_path / "bad" / "cats"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"not a png")
    (bad / "y.jpg").write_bytes(b"")
    reply = call(MessageType.QUERY, RecordDict({"config": ConfigRecord({})}),
                 {"data": str(tmp_path / "bad"), "kit-dir": str(assets["kit_dir"])})
    assert reply.error.code == NODE_DATA_ERROR
    assert "no readable image" in reply.error.reason and "2 unreadable" in reply.error.reason


def test_query_without_data_or_kit_is_refused(assets, tmp_path):
    reply = call(MessageType.QUERY, RecordDict({"config": ConfigRecord({})}),
                 {"kit-dir": str(assets["kit_dir"])})
    assert "no 'data' entry" in reply.error.reason
    reply = call(MessageType.QUERY, RecordDict({"config": ConfigRecord({})}),
                 {"data": "builtin:digits"})
    assert "no 'kit-dir'" in reply.error.reason
    reply = call(MessageType.QUERY, RecordDict({"config": ConfigRecord({})}),
                 {"data": str(tmp_path / "missing"), "kit-dir": str(assets["kit_dir"])})
    assert "does not exist" in reply.error.reason


# -- train / evaluate ------------------------------------------------------------------------

def test_train_returns_new_weights_and_num_examples(assets, start):
    model, spec = start
    node = digits_node(1, 2, assets["kit_dir"])
    before = model_to_arrays(model)
    reply = call(MessageType.TRAIN, model_content(model, spec, **{"local-epochs": 1, "lr": 0.05}),
                 node)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 718  # 80% of partition 1 (898 images)
    assert np.isfinite(metrics["train-loss"])
    after = reply.content["arrays"]
    assert set(after) == set(before)
    changed = [k for k in before if not np.array_equal(before[k].numpy(), after[k].numpy())]
    assert any(k.startswith("backbone.") for k in changed) and "head.weight" in changed


def test_linear_probe_keeps_the_sub_net_frozen(assets, start):
    model, spec = start
    before = model_to_arrays(model)
    reply = call(MessageType.TRAIN, model_content(model, spec, **{"fine-tune": "linear"}),
                 digits_node(0, 2, assets["kit_dir"]))
    after = reply.content["arrays"]
    for k in before:
        same = np.array_equal(before[k].numpy(), after[k].numpy())
        assert same == k.startswith("backbone."), k


def test_fedprox_term_keeps_weights_near_the_global_model(assets, start):
    model, spec = start
    base = state_of(model_to_arrays(model))
    drift = {}
    for mu in (0.0, 10.0):
        reply = call(MessageType.TRAIN, model_content(model, spec, **{"proximal-mu": mu,
                                                                      "lr": 0.05}),
                     digits_node(0, 2, assets["kit_dir"]))
        new = state_of(reply.content["arrays"])
        drift[mu] = sum(float((new[k] - base[k]).norm()) for k in base if "running" not in k)
    assert drift[10.0] < 0.8 * drift[0.0]


def test_evaluate_reports_held_out_loss_and_accuracy(assets, start):
    model, spec = start
    node = digits_node(0, 2, assets["kit_dir"])
    reply = call(MessageType.EVALUATE, model_content(model, spec), node)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 180  # 20% of partition 0
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0 and metrics["eval-loss"] > 0
    trained = call(MessageType.TRAIN, model_content(model, spec, **{"local-epochs": 3}), node)
    content = model_content(model, spec)
    content["arrays"] = trained.content["arrays"]
    after = call(MessageType.EVALUATE, content, node).content["metrics"]
    assert after["eval-accuracy"] > 0.3  # chance is 0.1
    assert after["eval-loss"] < metrics["eval-loss"]


def test_train_on_unlabelled_images_is_refused(start, tmp_path):
    model, spec = start
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        cv2.imwrite(str(flat / f"{i}.png"), np.full((8, 8), 40 * i, np.uint8))
    reply = call(MessageType.TRAIN, model_content(model, spec), {"data": str(flat)})
    assert reply.error.code == NODE_DATA_ERROR
    assert "no labels" in reply.error.reason


def test_wrong_weights_are_refused(assets, start):
    model, spec = start
    content = model_content(model, spec)
    del content["arrays"]["head.bias"]
    reply = call(MessageType.TRAIN, content, digits_node(0, 2, assets["kit_dir"]))
    assert reply.has_error() and "missing ['head.bias']" in reply.error.reason


# -- partitions ------------------------------------------------------------------------------

def test_iid_partitions_are_disjoint_and_cover_everything():
    parts = iid_partition(101, 4, seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(101))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_partitions_skew_labels_as_alpha_shrinks():
    labels = np.repeat(np.arange(10), 60)
    def skew(alpha):  # mean share of each partition's most common class
        parts = dirichlet_partition(labels, 5, alpha, seed=1)
        assert sorted(np.concatenate(parts).tolist()) == list(range(600))
        return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])
    assert skew(0.1) > 0.45 > skew(100.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(labels, 5, 0.0)


def test_train_test_split_holds_out_a_fraction():
    train, test = train_test_split(50, 0.2, seed=0)
    assert len(test) == 10 and not set(train) & set(test)
    with pytest.raises(ValueError, match="at least 2 images"):
        train_test_split(1, 0.2)


# -- the server flow on an in-process grid ---------------------------------------------------

def test_server_flow_survives_a_node_with_empty_data(assets, tmp_path):
    (tmp_path / "empty").mkdir()
    nodes = [digits_node(i, 2, assets["kit_dir"]) for i in range(2)]
    nodes.append({"data": str(tmp_path / "empty"), "kit-dir": str(assets["kit_dir"])})
    cfg = FederationConfig.from_run_config({
        "run-dir": str(assets["run_dir"]), "signing-key": str(assets["key"]),
        "out-dir": str(tmp_path / "out"), "num-server-rounds": 2, "min-nodes": 2,
        "min-round-nodes": 2, "strategy": "fedprox", "proximal-mu": 0.01})
    with server_identity():
        summary = run_federation(LocalGrid(app, nodes), cfg)
    assert list(summary["node_errors"]) == ["4"]
    assert "no readable image" in summary["node_errors"]["4"]
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    last = report["rounds"][-1]
    assert last["train_ok"] == 2 and "no readable image" in last["train_failed"]["4"]
    bundle = load_bundle(tmp_path / "out" / "bundle", load_public_key(assets["pub"]))
    assert bundle.manifest["provenance"]["federated"]["strategy"] == "fedprox"
    assert "metrics.json" in bundle.manifest["files"]


def test_server_flow_fails_clearly_when_too_few_nodes_answer(assets, tmp_path):
    (tmp_path / "empty").mkdir()
    nodes = [digits_node(0, 2, assets["kit_dir"]),
             {"data": str(tmp_path / "empty"), "kit-dir": str(assets["kit_dir"])}]
    cfg = FederationConfig.from_run_config({
        "run-dir": str(assets["run_dir"]), "signing-key": str(assets["key"]),
        "out-dir": str(tmp_path / "out"), "min-nodes": 2, "node-wait-timeout": 1.0})
    with server_identity(), pytest.raises(FederationError,
                                          match="1 of 2 node.*node 3: node data error"):
        run_federation(LocalGrid(app, nodes), cfg)
    assert not (tmp_path / "out" / "bundle").exists()


def test_run_config_errors_name_the_key(assets):
    with pytest.raises(FederationConfigError, match="exactly one of run-dir"):
        FederationConfig.from_run_config({"signing-key": "k"})
    with pytest.raises(FederationConfigError, match="fedprox' needs proximal-mu"):
        FederationConfig.from_run_config({"run-dir": "r", "signing-key": "k",
                                          "strategy": "fedprox"})
    with pytest.raises(FederationConfigError, match="'lr': cannot read 'fast'"):
        FederationConfig.from_run_config({"run-dir": "r", "signing-key": "k", "lr": "fast"})


# -- the fine-tuned bundle sent back to nodes ------------------------------------------------

def test_node_keeps_only_a_bundle_that_verifies(assets, start, tmp_path, keypair):
    from sdr_edge.artifacts.bundle import write_bundle
    from sdr_edge.artifacts.transfer import read_folder
    from sdr_edge.federated.task import bundle_record

    model, spec = start
    key, pub, keydir = keypair
    files = read_folder(write_bundle(model, tmp_path / "b", ROUTE, spec, key, {"t": 1}))
    node = {"data": "builtin:digits", "bundle-dir": str(tmp_path / "kept"),
            "server-pubkey": str(keydir / "server.pub")}
    reply = call("query.bundle", bundle_record(files), node)
    assert reply.content["metrics"]["saved"] == 1
    assert load_bundle(tmp_path / "kept", pub).route == ROUTE
    tampered = dict(files, **{"weights.safetensors": files["weights.safetensors"][:-1] + b"\0"})
    reply = call("query.bundle", bundle_record(tampered), {**node, "bundle-dir": str(tmp_path / "x")})
    assert reply.has_error() and "checksum" in reply.error.reason
    assert not (tmp_path / "x").exists()
    reply = call("query.bundle", bundle_record(files), {"data": "builtin:digits"})
    assert reply.content["metrics"]["saved"] == 0  # a node without bundle-dir keeps nothing
