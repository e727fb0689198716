"""Fleet re-ranking: the nodes score the signature's top M, the server fine-tunes the best one."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from helpers_flower import digits_node
from helpers_registry import serve_registry

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.run_dir import load_sdrnet
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.federated.client_app import app
from sdr_edge.federated.config import FederationConfig, FederationConfigError
from sdr_edge.federated.consensus_exchange import FEATURES_STATE, consensus_on_fleet
from sdr_edge.federated.fleet_rerank import (
    Candidate,
    candidates_content,
    rerank_on_fleet,
    weighted_choice,
)
from sdr_edge.federated.node_data import NodeDataConfig, load_node_data
from sdr_edge.federated.server_flow import run_federation
from sdr_edge.federated.strategy import FederationError
from sdr_edge.federated.testing import LocalGrid, server_identity
from sdr_edge.registry_client import post_route
from sdr_edge.routing.fleet_consensus import fleet_consensus_logme
from sdr_edge.routing.probe import extract_features
from sdr_edge.routing.signature import score_routes, validate_signature
from sdr_edge.routing.transferability import consensus_logme, logme

LIMIT = 600  # digits per fleet: enough for LogME and one round, seconds on one thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here extracts features or trains: one torch thread (conftest)."""


def nodes(assets, n: int = 2) -> list[dict]:
    return [digits_node(i, n, assets["kit_dir"], limit=LIMIT) for i in range(n)]


def base_config(assets, out, **extra) -> FederationConfig:
    return FederationConfig.from_run_config({
        "signing-key": str(assets["key"]), "out-dir": str(out), "num-server-rounds": 1,
        "local-epochs": 1, "evaluate-start": False, **extra})


def one_class_folder(folder, n: int = 6):
    rng = np.random.default_rng(0)
    (folder / "a").mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(folder / "a" / f"{i}.png"), rng.integers(0, 255, (20, 20), np.uint8))
    return folder


def test_weighted_choice_weights_nodes_by_their_image_count():
    # node 2 (300 images) prefers candidate 0, node 3 (100 images) candidate 1
    means, best = weighted_choice({2: (300, [0.6, 0.2]), 3: (100, [0.1, 0.5])})
    assert means == pytest.approx([0.475, 0.275]) and best == 0
    means, best = weighted_choice({2: (50, [0.6, 0.2]), 3: (100, [0.1, 0.5])})
    assert means == pytest.approx([0.8 / 3, 1.2 / 3]) and best == 1
    assert weighted_choice({2: (10, [0.3, 0.3])})[1] == 0  # a tie keeps the better-routed


def test_fleet_fine_tunes_the_candidate_the_nodes_score_best(assets, tmp_path):
    cfg = base_config(assets, tmp_path / "out", **{"run-dir": str(assets["run_dir"]),
                                                   "rerank": "logme", "rerank-top-m": 4})
    with server_identity():
        summary = run_federation(LocalGrid(app, nodes(assets)), cfg)
    r = summary["rerank"]
    # the candidates are the aggregated signature's top 4, in routing order
    sig = validate_signature(summary["signature"])
    top = [list(route) for route, _ in score_routes(sig)[:4]]
    assert [c["route"] for c in r["candidates"]] == top and r["signature_route"] == top[0]
    # each node's score is LogME of the candidate's features on its own training split
    net, spec = load_sdrnet(assets["run_dir"])
    shares = [load_node_data(NodeDataConfig("builtin:digits", i, 2, limit=LIMIT), 16, 1).train
              for i in range(2)]
    for node, share in zip(r["nodes_scored"], shares, strict=True):
        expected = [logme(extract_features(net.extract(tuple(route)), share.images, spec),
                          share.labels) for route in top]
        assert r["node_errors"] == {}
        assert summary_scores(summary, node) == pytest.approx(expected, abs=1e-4)
    weights = [len(s) for s in shares]
    fleet = [c["fleet_score"] for c in r["candidates"]]
    assert fleet == pytest.approx([sum(w * summary_scores(summary, n)[i] for w, n in
                                       zip(weights, r["nodes_scored"], strict=True)) / sum(weights)
                                   for i in range(4)], abs=1e-5)
    assert r["route"] == top[int(np.argmax(fleet))] == summary["route"]
    # what was fine-tuned and signed is the fleet's pick, and the bundle says how it was picked
    bundle = load_bundle(tmp_path / "out" / "bundle", load_public_key(assets["pub"]))
    assert list(bundle.route) == r["route"]
    assert bundle.manifest["provenance"]["federated"]["rerank"]["method"] == "logme"
    assert r["bytes_per_node"] > 4 * 4 * sum(p.numel() for p in net.extract(tuple(top[0]))
                                             .parameters())  # four float32 sub-nets


def summary_scores(summary: dict, node: int) -> list[float]:
    return summary["rerank"]["node_scores"][str(node)]["scores"]


def test_registry_fleet_rerank_downloads_the_registry_top_m(assets, tmp_path):
    with serve_registry(assets["run_dir"], tmp_path / "registry") as registry:
        (tmp_path / "token").write_text(registry.token)
        cfg = base_config(assets, tmp_path / "out", **{
            "registry-url": registry.url, "registry-token-file": str(tmp_path / "token"),
            "registry-pubkey": str(registry.pubkey), "rerank": "knn", "rerank-top-m": 2})
        with server_identity():
            summary = run_federation(LocalGrid(app, nodes(assets)), cfg)
        served = post_route(registry.url, registry.token, summary["signature"], top=2)
    r = summary["rerank"]
    assert [c["route"] for c in r["candidates"]] == [row["route"] for row in served["scores"][:2]]
    assert summary["route"] == r["route"] and summary["source"]["kind"] == "registry"
    assert summary["source"]["bundle_sha256"]
    assert all(0.0 <= c["fleet_score"] <= 1.0 for c in r["candidates"])  # kNN accuracies


def test_nodes_that_cannot_score_are_left_out_and_none_is_an_error(assets, tmp_path):
    net, spec = load_sdrnet(assets["run_dir"])
    cands = [Candidate(route, 0.0, net.extract(route).eval()) for route in ((1, 2, 0, 3),
                                                                           (0, 0, 0, 0))]
    one_class = {"data": str(one_class_folder(tmp_path / "one")), "kit-dir": str(assets["kit_dir"])}
    with server_identity():
        result = rerank_on_fleet(LocalGrid(app, [nodes(assets)[0], one_class]), cands, spec,
                                 10, "logme", timeout=60)
        assert sorted(result.node_scores) == [2] and list(result.errors) == [3]
        assert "needs two classes" in result.errors[3]
        with pytest.raises(FederationError, match="no node scored the 2 candidates.*node 2: "
                                                   ".*needs two classes"):
            rerank_on_fleet(LocalGrid(app, [one_class]), cands, spec, 10, "logme", timeout=60)


def test_label_free_consensus_scores_every_local_image_on_the_fleet(assets, tmp_path):
    """consensus needs no labels: a node scores all its images (train and held-out split) and
    a node with fewer images than clusters is left out, with the reason."""
    net, spec = load_sdrnet(assets["run_dir"])
    routes = ((1, 2, 0, 3), (0, 0, 0, 0), (2, 1, 3, 0))
    cands = [Candidate(route, 0.0, net.extract(route).eval()) for route in routes]
    tiny = {"data": str(one_class_folder(tmp_path / "one")), "kit-dir": str(assets["kit_dir"])}
    with server_identity():
        result = rerank_on_fleet(LocalGrid(app, [nodes(assets)[0], tiny]), cands, spec,
                                 10, "consensus", timeout=60)
    assert sorted(result.node_scores) == [2] and "more than 16 local images, got 6" in \
        result.errors[3]
    local = load_node_data(NodeDataConfig("builtin:digits", 0, 2, limit=LIMIT), 16, 1)
    expected = consensus_logme([extract_features(net.extract(r), local.all_images(), spec)
                                for r in routes])
    assert result.to_dict()["node_scores"]["2"]["scores"] == pytest.approx(expected, abs=1e-4)
    assert result.index == int(np.argmax(expected))


def test_rerank_message_survives_the_wire_format(assets):
    """What the SuperLink carries: the protobuf form of the message round-trips every tensor."""
    net, spec = load_sdrnet(assets["run_dir"])
    cands = [Candidate((1, 2, 0, 3), 0.0, net.extract((1, 2, 0, 3)))]
    content = candidates_content(cands, spec, 10, "probe")
    back = recorddict_from_proto(recorddict_to_proto(content))
    assert back["config"]["method"] == "probe" and back["config"]["candidates"] == 1
    for key, arr in content["candidate-0-arrays"].items():
        np.testing.assert_array_equal(back["candidate-0-arrays"][key].numpy(), arr.numpy())


def test_consensus_steps_survive_the_wire_format():
    """The consensus exchanges' arrays (float64 statistics, int64 sizes) and the plan's int
    lists round-trip through the SuperLink's protobuf form."""
    from sdr_edge.federated.consensus_exchange import CENTROIDS, _step_content

    rng = np.random.default_rng(0)
    arrays = {"mean": rng.normal(size=(3, 8)), "sizes-0": np.arange(5, dtype=np.int64)}
    content = _step_content(CENTROIDS, {"clusters": [16, 32], "seeds": [0, 1]}, arrays)
    back = recorddict_from_proto(recorddict_to_proto(content))
    assert list(back["config"]["clusters"]) == [16, 32] and back["config"]["step"] == CENTROIDS
    for key, value in arrays.items():
        got = back["statistics"][key].numpy()
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)


def test_rerank_config_errors_name_the_key():
    base = {"run-dir": "r", "signing-key": "k"}
    with pytest.raises(FederationConfigError, match="rerank must be one of .*'fancy'"):
        FederationConfig.from_run_config({**base, "rerank": "fancy"})
    with pytest.raises(FederationConfigError, match="route fixes the sub-net"):
        FederationConfig.from_run_config({**base, "rerank": "logme", "route": "1,2,0,3"})
    with pytest.raises(FederationConfigError, match="'rerank-top-m'"):
        FederationConfig.from_run_config({**base, "rerank": "logme", "rerank-top-m": 1})
    assert FederationConfig.from_run_config({**base, "rerank": " LogME "}).rerank == "logme"


def test_fleet_consensus_over_messages_is_the_in_process_protocol(assets, tmp_path):
    """rerank-consensus = "fleet": three exchanges (moments, k-FED centroids, LogME statistics)
    give the scores `fleet_consensus_logme` computes from the nodes' features, and a node
    too small to send centroids still counts its images."""
    net, spec = load_sdrnet(assets["run_dir"])
    routes = ((1, 2, 0, 3), (0, 0, 0, 0), (2, 1, 3, 0))
    cands = [Candidate(route, 0.0, net.extract(route).eval()) for route in routes]
    tiny = {"data": str(one_class_folder(tmp_path / "one")), "kit-dir": str(assets["kit_dir"])}
    fleet = [*nodes(assets), tiny]
    with server_identity():
        grid = LocalGrid(app, fleet)
        result = consensus_on_fleet(grid, cands, spec, 10, timeout=60)
    # the features a node kept between the steps leave its run state after the last one
    assert all(FEATURES_STATE not in c.state for c in grid.contexts.values())
    images = [load_node_data(NodeDataConfig("builtin:digits", i, 2, limit=LIMIT), 16,
                             1).all_images() for i in range(2)]
    images.append(load_node_data(NodeDataConfig(tiny["data"]), 16, 1).all_images())
    shares = [[extract_features(net.extract(r), x, spec) for r in routes] for x in images]
    expected = fleet_consensus_logme(shares)
    assert result.scores == pytest.approx(expected, abs=1e-6)
    assert result.index == int(np.argmax(expected)) and result.errors == {}
    assert result.to_dict()["images_scored"] == sum(len(x) for x in images)
    # the federation takes this path for rerank = "consensus" unless told "node"
    assert FederationConfig.from_run_config({"run-dir": "r", "signing-key": "k",
                                             "rerank": "consensus"}).rerank_consensus == "fleet"
    with pytest.raises(FederationConfigError, match="rerank-consensus"):
        FederationConfig.from_run_config({"run-dir": "r", "signing-key": "k",
                                          "rerank": "consensus", "rerank-consensus": "both"})


def test_a_consensus_step_before_the_moments_is_refused(assets):
    from sdr_edge.federated.consensus_exchange import CENTROIDS, _step_content

    content = _step_content(CENTROIDS, {"clusters": [16], "seeds": [0]},
                            {"mean": np.zeros((1, 4)), "std": np.ones((1, 4))})
    with server_identity():
        grid = LocalGrid(app, nodes(assets, 1))
        node = next(iter(grid.get_node_ids()))
        from flwr.app import Message, MessageType
        reply = next(iter(grid.send_and_receive(
            [Message(content, dst_node_id=node, message_type=f"{MessageType.QUERY}.rerank")],
            timeout=30)))
    assert reply.has_error() and "before the moments step" in reply.error.reason


def test_a_failed_last_step_still_drops_the_kept_features():
    """A node whose step 3 fails is left out and never asked again: its features must leave
    the run state all the same, not ride along into the fine-tuning rounds."""
    from flwr.app import RecordDict

    from sdr_edge.federated.consensus_exchange import (
        STATISTICS,
        _step_content,
        node_moments,
        node_statistics,
    )

    rng = np.random.default_rng(0)
    state = RecordDict()
    node_moments([rng.normal(size=(20, 4)).astype(np.float32)], state)
    assert FEATURES_STATE in state.array_records
    # a standardiser of the wrong shape: the step is refused in one line
    bad = _step_content(STATISTICS, {"clusters": [4]},
                        {"mean": np.zeros((2, 4)), "std": np.ones((2, 4))})
    with pytest.raises(ValueError, match="standardiser has shape"):
        node_statistics(bad, state)
    assert FEATURES_STATE not in state.array_records
