"""The ServerApp's work: query signatures, route, extract the sub-net, FedAvg it, sign the result.

With `rerank` set, the route is the one of the signature's top M that the nodes' labelled data
scores best (`sdr_edge.federated.fleet_rerank`), not the signature's first.

`run_federation(grid, cfg)` runs on any Flower `Grid`: the Deployment Engine's (real SuperLink
and SuperNodes) or `LocalGrid` (the same ClientApp handlers in this process, for the
benchmark and fast tests).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from sdr_edge.artifacts.bundle import load_bundle, write_bundle
from sdr_edge.artifacts.signing import load_private_key, load_public_key
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.federated.config import FederationConfig, FederationConfigError
from sdr_edge.federated.consensus_exchange import consensus_on_fleet
from sdr_edge.federated.fleet_rerank import Candidate, FleetRerank, rerank_on_fleet
from sdr_edge.federated.records import (
    arrays_into_model,
    arrays_nbytes,
    batchnorm_keys,
    describe_model,
    model_to_arrays,
)
from sdr_edge.federated.report import metrics_json, plot_rounds, round_rows, write_metrics
from sdr_edge.federated.strategy import (
    FederationError,
    make_strategy,
    reply_outcomes,
    wait_for_nodes,
)
from sdr_edge.federated.task import BUNDLE_ACTION, METRICS, SIGNATURE, bundle_record
from sdr_edge.models.classifier import SubnetModel
from sdr_edge.models.resnet import Backbone
from sdr_edge.routing.signature import (
    Signature,
    SignatureValidationError,
    aggregate_signatures,
    check_run_id,
    route_score,
    route_signature,
    score_routes,
    served_run_id,
)

log = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"
REPORT_DIR = "report"
SUMMARY = "summary.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "federated_rounds.png"


@dataclass
class NodeAnswer:
    """One node's reply to the signature query."""

    node_id: int
    signature: Signature
    num_classes: int
    label_names: tuple[str, ...]


@dataclass
class QueryOutcome:
    answers: dict[int, NodeAnswer]
    errors: dict[int, str] = field(default_factory=dict)


@dataclass
class StartModel:
    """The routed sub-net before fine-tuning, and where it came from."""

    backbone: Backbone
    spec: InputSpec
    route: tuple[int, ...]
    source: dict
    sdrnet_bytes: int | None = None


def _parse_answer(msg: Message) -> NodeAnswer:
    content = msg.content
    sig_rec = content.config_records.get(SIGNATURE)
    metrics = content.metric_records.get(METRICS)
    if sig_rec is None or metrics is None:
        raise ValueError("reply lacks the signature or its metrics")
    signature = Signature.from_json(str(sig_rec["signature"]))
    names = json.loads(str(sig_rec.get("label-names", "[]")))
    return NodeAnswer(int(msg.metadata.src_node_id), signature,
                      int(metrics.get("num-classes", 0)), tuple(str(n) for n in names))


def query_signatures(grid: Grid, min_nodes: int, wait_timeout: float,
                     reply_timeout: float) -> QueryOutcome:
    """Ask every connected node (at least min_nodes) for its signature."""
    nodes = wait_for_nodes(grid, min_nodes, wait_timeout, "signature query")
    log.info("querying %d node(s) for their signature", len(nodes))
    messages = [Message(RecordDict({"config": ConfigRecord({"want": "signature"})}),
                        dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=reply_timeout))
    ok, failed = reply_outcomes(messages, replies)
    outcome = QueryOutcome({}, failed)
    for msg in ok:
        try:
            answer = _parse_answer(msg)
        except (ValueError, KeyError, SignatureValidationError) as exc:
            outcome.errors[int(msg.metadata.src_node_id)] = f"malformed signature reply: {exc}"
            continue
        outcome.answers[answer.node_id] = answer
    for n, reason in sorted(outcome.errors.items()):
        log.warning("node %d gave no signature: %s", n, reason)
    if len(outcome.answers) < min_nodes:
        reasons = "; ".join(f"node {n}: {r}" for n, r in sorted(outcome.errors.items()))
        raise FederationError(f"signature query: {len(outcome.answers)} of {len(nodes)} node(s) "
                              f"answered, min-nodes is {min_nodes} ({reasons})")
    return outcome


def choose_route(cfg: FederationConfig, outcome: QueryOutcome) -> tuple[tuple[int, ...] | None,
                                                                        Signature]:
    """Aggregate the nodes' signatures by image count; route unless the config fixes one."""
    try:
        signature = aggregate_signatures(a.signature for a in outcome.answers.values())
    except ValueError as exc:  # the nodes hold kits of different runs (or branchings)
        raise FederationError(f"signature query: {exc}") from exc
    fixed = cfg.fixed_route()
    route = fixed if fixed is not None else route_signature(signature)
    log.info("aggregated signature of %d images from %d node(s) -> route %s%s", signature.count,
             len(outcome.answers), list(route), " (fixed by the run config)" if fixed else "")
    return route, signature


def _float_bytes(module: torch.nn.Module) -> int:
    return int(sum(v.numel() * v.element_size() for v in module.state_dict().values()
                   if v.is_floating_point()))


def _run_dir_sdrnet(cfg: FederationConfig, signature: Signature):
    """The SDRnet of cfg.run_dir, checked against the nodes' signatures (branching, run id)."""
    from sdr_edge.artifacts.run_dir import load_sdrnet

    net, spec = load_sdrnet(cfg.run_dir)
    if tuple(signature.branching) != tuple(net.branching):
        raise FederationError(f"the nodes' signatures have branching "
                              f"{list(signature.branching)} but the SDRnet in {cfg.run_dir} "
                              f"routes over {list(net.branching)}: is the nodes' kit from "
                              "this run?")
    try:  # a route from another run's kit would pick the wrong experts
        if cfg.fixed_route() is None:
            check_run_id(signature, *served_run_id(cfg.run_dir))
    except SignatureValidationError as exc:
        raise FederationError(f"the nodes' signatures do not fit {cfg.run_dir}: "
                              f"{exc}") from exc
    return net, spec


def _run_dir_source(cfg: FederationConfig) -> dict:
    return {"kind": "run-dir", "run_dir": str(Path(cfg.run_dir).resolve())}


def _registry_source(cfg: FederationConfig, bundle) -> dict:
    return {"kind": "registry", "registry_url": cfg.registry_url,
            "bundle_sha256": bundle.manifest["files"].get("weights.safetensors")}


def load_start_model(cfg: FederationConfig, route: tuple[int, ...] | None,
                     signature: Signature) -> StartModel:
    """The routed sub-net from the run directory, or verified from the registry."""
    if cfg.run_dir:
        net, spec = _run_dir_sdrnet(cfg, signature)
        assert route is not None
        backbone = net.extract(route).eval()
        return StartModel(backbone, spec, tuple(route), _run_dir_source(cfg), _float_bytes(net))
    from sdr_edge.registry_client import fetch_bundle

    with tempfile.TemporaryDirectory(prefix="sdr-subnet-") as tmp:
        target = route if cfg.fixed_route() is not None else signature
        folder = fetch_bundle(cfg.registry_url, cfg.registry_token(), target, cfg.registry_pubkey,
                              Path(tmp) / "subnet", cacert=cfg.registry_cacert or None)
        bundle = load_bundle(folder, load_public_key(cfg.registry_pubkey))
    return StartModel(bundle.model.backbone.eval(), bundle.input_spec, bundle.route,
                      _registry_source(cfg, bundle))


def load_candidates(cfg: FederationConfig, signature: Signature) -> list[StartModel]:
    """The signature's top `rerank-top-m` sub-nets, best routing score first: extracted from
    the run directory, or downloaded from the registry and each verified in memory."""
    if cfg.run_dir:
        net, spec = _run_dir_sdrnet(cfg, signature)
        return [StartModel(net.extract(r).eval(), spec, tuple(r), _run_dir_source(cfg),
                           _float_bytes(net))
                for r, _ in score_routes(signature)[:cfg.rerank_top_m]]
    from sdr_edge.artifacts.bundle import bundle_from_files
    from sdr_edge.registry_client import fetch_candidates

    key = load_public_key(cfg.registry_pubkey)
    out = []
    for _, files in fetch_candidates(cfg.registry_url, cfg.registry_token(), signature, key,
                                     cfg.rerank_top_m, cacert=cfg.registry_cacert or None):
        bundle = bundle_from_files(files, key)
        out.append(StartModel(bundle.model.backbone.eval(), bundle.input_spec, bundle.route,
                              _registry_source(cfg, bundle)))
    return out


def rerank_start_model(grid: Grid, cfg: FederationConfig, signature: Signature,
                       num_classes: int) -> tuple[StartModel, FleetRerank]:
    """The top-M candidate the nodes' labelled data scores best (`fleet_rerank`)."""
    loaded = load_candidates(cfg, signature)
    if not loaded:
        raise FederationError("re-rank: the signature gave no candidate sub-net")
    candidates = [Candidate(m.route, route_score(signature, m.route), m.backbone) for m in loaded]
    if cfg.rerank == "consensus" and cfg.rerank_consensus == "fleet":
        result = consensus_on_fleet(grid, candidates, loaded[0].spec, num_classes,
                                    cfg.round_timeout)
    else:
        result = rerank_on_fleet(grid, candidates, loaded[0].spec, num_classes, cfg.rerank,
                                 cfg.round_timeout)
    return loaded[result.index], result


def _classes(outcome: QueryOutcome) -> tuple[int, tuple[str, ...]]:
    num_classes = max(a.num_classes for a in outcome.answers.values())
    if num_classes < 2:
        raise FederationError("no node reported labelled data with at least 2 classes: "
                              "fine-tuning needs one sub-folder per class on the nodes")
    names = next((a.label_names for a in outcome.answers.values()
                  if len(a.label_names) == num_classes), ())
    return num_classes, names


def _evaluate_start(grid: Grid, strategy, arrays, config: ConfigRecord,
                    timeout: float) -> MetricRecord | None:
    """Round 0: the routed sub-net with its fresh head, before any fine-tuning."""
    replies = grid.send_and_receive(strategy.configure_evaluate(0, arrays, config, grid),
                                    timeout=timeout)
    return strategy.aggregate_evaluate(0, replies)


def prune_for_budget(model: SubnetModel, spec: InputSpec, macs_ratio: float
                     ) -> tuple[SubnetModel, dict | None]:
    """The routed sub-net cut to `macs_ratio` of its MACs before any round (None: not pruned).

    The library's pruning (`sdr_edge.pruning.prune_to_macs`: torch-pruning, group L2
    magnitude, head and feature layer kept) runs once here, so every node fine-tunes the
    network the fleet's budget allows and FedAvg averages tensors of one shape; nodes rebuild
    the widths from the weights they receive (records.model_from_message). The summary with
    the channel widths goes into the bundle's provenance, as `sdr-client prune` records it.
    """
    if macs_ratio >= 1.0:
        return model, None
    from sdr_edge.pruning import PRUNE_METHOD, PruningError, prune_to_macs

    try:
        result = prune_to_macs(model, spec, macs_ratio, progress=False)
    except PruningError as exc:
        raise FederationConfigError(f"prune-macs-ratio {macs_ratio}: {exc}") from exc
    log.info("pruned the sub-net to %.3f of its MACs (%d -> %d, target %s)", result.macs_ratio,
             result.macs_before, result.macs_after, macs_ratio)
    return result.model, {**result.summary(), "target_macs_ratio": macs_ratio,
                          "method": PRUNE_METHOD}


def deliver_bundle(grid: Grid, bundle_dir: Path, timeout: float) -> dict[str, str]:
    """Send the signed bundle to every connected node; node id -> 'kept' / 'not kept' / reason.

    Nodes verify it with the federation's public key before keeping it (the on-device agent
    waits for it); a node that fails here does not fail the run: the bundle is already saved.
    """
    from sdr_edge.artifacts.transfer import read_folder

    content = bundle_record(read_folder(bundle_dir))
    nodes = sorted(grid.get_node_ids())
    messages = [Message(content, dst_node_id=n, message_type=f"{MessageType.QUERY}.{BUNDLE_ACTION}")
                for n in nodes]
    ok, failed = reply_outcomes(messages, list(grid.send_and_receive(messages, timeout=timeout)))
    result = {str(n): reason for n, reason in failed.items()}
    for msg in ok:
        kept = msg.content.metric_records.get(METRICS, {}).get("saved", 0)
        result[str(msg.metadata.src_node_id)] = "kept" if kept else "not kept"
    log.info("fine-tuned bundle sent to %d node(s): %s", len(nodes), result)
    return result


def run_federation(grid: Grid, cfg: FederationConfig) -> dict:
    """Route, fine-tune with the configured strategy, save the signed bundle; return the summary."""
    started = time.time()
    key_path = Path(cfg.signing_key).expanduser()
    if not key_path.is_file():
        raise FederationConfigError(f"signing-key {key_path} does not exist "
                                    "(create one with sdr-server keygen)")
    key = load_private_key(key_path)
    out_dir = Path(cfg.out_dir).expanduser().resolve()

    outcome = query_signatures(grid, cfg.min_nodes, cfg.node_wait_timeout, cfg.round_timeout)
    route, signature = choose_route(cfg, outcome)
    num_classes, names = _classes(outcome)
    reranked = None
    if cfg.rerank:
        start, reranked = rerank_start_model(grid, cfg, signature, num_classes)
    else:
        start = load_start_model(cfg, route, signature)
    torch.manual_seed(cfg.seed)
    model = SubnetModel(start.backbone, num_classes).eval()
    spec = dataclasses.replace(start.spec, label_names=names)
    model, pruned = prune_for_budget(model, spec, cfg.prune_macs_ratio)
    described = describe_model(model, spec, start.route)
    arrays = model_to_arrays(model)
    log.info("sub-net %s: %d bytes per transfer (whole SDRnet: %s)", list(start.route),
             arrays_nbytes(arrays), start.sdrnet_bytes)

    strategy = make_strategy(cfg, *batchnorm_keys(model))
    eval_config = ConfigRecord({**described, "fedbn": cfg.fedbn})
    train_config = ConfigRecord({**described, **cfg.train_config()})
    initial = (_evaluate_start(grid, strategy, arrays, ConfigRecord(dict(described)),
                               cfg.round_timeout) if cfg.evaluate_start else None)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.num_rounds,
                            timeout=cfg.round_timeout, train_config=train_config,
                            evaluate_config=eval_config)
    arrays_into_model(model, result.arrays)

    evaluations = {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
    if initial is not None:
        evaluations[0] = dict(initial)
    rows = round_rows({r: dict(m) for r, m in result.train_metrics_clientapp.items()},
                      evaluations, {r: e.to_dict() for r, e in strategy.rounds.items()})
    last = max((r for r in rows if "eval-accuracy" in r), key=lambda r: r["round"], default={})
    summary = {
        "route": list(start.route),
        "rerank": reranked.to_dict() if reranked is not None else None,
        "strategy": cfg.strategy,
        "proximal_mu": cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        "fedbn": cfg.fedbn,
        "bundle_batchnorm": ("num-examples weighted mean of the nodes' own BatchNorm layers "
                             "(sent in the last round)" if cfg.fedbn else "aggregated each round"),
        "lr_schedule": cfg.lr_schedule,
        "head_rounds": cfg.head_rounds,
        "fine_tune": cfg.fine_tune,
        "rounds": cfg.num_rounds,
        "local_epochs": cfg.local_epochs,
        "nodes": sorted(outcome.answers),
        "node_errors": {str(k): v for k, v in outcome.errors.items()},
        "images": signature.count,
        "signature": signature.to_dict(),
        "num_classes": num_classes,
        "final_accuracy": last.get("eval-accuracy"),
        "subnet_bytes": arrays_nbytes(arrays),
        "sdrnet_bytes": start.sdrnet_bytes,
        "source": start.source,
        "pruned": pruned,
        "seconds": round(time.time() - started, 1),
    }
    bundle = write_bundle(model, out_dir / BUNDLE_DIR, start.route, spec, key,
                          provenance={"federated": {k: v for k, v in summary.items()
                                                    if k != "signature"}},
                          extra_files={METRICS_FILE: metrics_json(rows, summary)})
    write_metrics(out_dir / REPORT_DIR / METRICS_FILE, rows, summary)
    plot_rounds(out_dir / REPORT_DIR / PLOT_FILE, rows,
                f"federated fine-tuning of sub-net {list(start.route)} ({cfg.strategy})")
    summary["bundle"] = str(bundle)
    summary["delivered"] = deliver_bundle(grid, bundle, cfg.round_timeout)
    write_metrics(out_dir / SUMMARY, rows, summary)
    log.info("saved the fine-tuned bundle to %s (final held-out accuracy %s)", bundle,
             summary["final_accuracy"])
    return summary
