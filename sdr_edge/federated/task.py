"""What a node does for each Flower message: query (signature), train, evaluate.

Each task takes the received RecordDict and the node's `node_config` and returns the reply's
RecordDict, or raises `NodeDataError` / `ValueError` with a message for the server. The
ClientApp turns those into error replies, so the server logs the reason instead of waiting.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from sdr_edge.federated.node_data import NodeData, NodeDataConfig, NodeDataError, load_node_data
from sdr_edge.federated.records import (
    batchnorm_keys,
    model_from_message,
    model_to_arrays,
)
from sdr_edge.training.finetune import ROUND_LR, FineTuneConfig, evaluate_local, train_local

log = logging.getLogger(__name__)

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SIGNATURE = "signature"
NUM_EXAMPLES = "num-examples"
FILES = "files"
LOCAL_BN = "fedbn-local-batchnorm"  # node state: this node's own BatchNorm layers
BUNDLE_ACTION = "bundle"  # message type "query.bundle": the signed fine-tuned bundle


@lru_cache(maxsize=4)
def _cached_node_data(cfg: NodeDataConfig, image_size: int, channels: int,
                      need_labels: bool) -> NodeData:
    return load_node_data(cfg, image_size, channels, need_labels)


def node_data(node_config: Mapping[str, object], image_size: int, channels: int,
              need_labels: bool = True) -> NodeData:
    """The node's data, loaded once per process (a ClientApp process may serve many rounds)."""
    return _cached_node_data(NodeDataConfig.from_node_config(node_config), image_size, channels,
                             need_labels)


def _config(content: RecordDict) -> ConfigRecord:
    if CONFIG not in content.config_records:
        raise ValueError(f"message carries no {CONFIG!r} ConfigRecord")
    return content.config_records[CONFIG]


def _arrays(content: RecordDict) -> ArrayRecord:
    if ARRAYS not in content.array_records:
        raise ValueError(f"message carries no {ARRAYS!r} ArrayRecord")
    return content.array_records[ARRAYS]


def query_task(content: RecordDict, node_config: Mapping[str, object],
               state: RecordDict | None = None) -> RecordDict:
    """The node's signature over all its local images, computed with the local kit."""
    from sdr_edge.routing.kit_runtime import KitError, KitRunner, compute_signature

    cfg = NodeDataConfig.from_node_config(node_config)
    if not cfg.kit_dir:
        raise NodeDataError("node config has no 'kit-dir' (the signature kit fetched from the "
                            "registry, or RUN_DIR/kit)")
    try:
        runner = KitRunner(cfg.kit_dir)
    except (KitError, OSError, KeyError) as exc:
        raise NodeDataError(f"signature kit {cfg.kit_dir!r} is unusable: {exc}") from exc
    data = node_data(node_config, runner.spec.image_size, runner.spec.channels, need_labels=False)
    eps = node_config.get("dp-epsilon")
    signature = compute_signature(runner, data.all_images(),
                                  dp_epsilon=float(eps) if eps not in (None, "", 0) else None)
    labels = data.train.label_names or ()
    log.info("signature of %d local images (%s)", signature.count, cfg.data)
    return RecordDict({
        SIGNATURE: ConfigRecord({"signature": signature.to_json(),
                                 "label-names": json.dumps(list(labels)),
                                 "data": data.train.name.rsplit(":", 1)[0]}),
        METRICS: MetricRecord({NUM_EXAMPLES: int(signature.count),
                               "num-classes": int(data.num_classes),
                               "skipped": len(data.skipped)}),
    })


def rerank_task(content: RecordDict, node_config: Mapping[str, object],
                state: RecordDict | None = None) -> RecordDict:
    """Score each candidate sub-net the server sent by its features on this node's data.

    Labelled methods (LogME, kNN, the CV probe) score on the training split, the images the
    node fine-tunes on, and need two classes; RankMe and the consensus score use every local
    image. Only the scores and the image count go back (`sdr_edge.federated.fleet_rerank`).
    With a `step` in the config, one of the fleet consensus's three exchanges instead: the
    moments step extracts and keeps the features, the later ones reuse them
    (`sdr_edge.federated.consensus_exchange`).
    """
    from sdr_edge.federated.consensus_exchange import MOMENTS, NODE_STEPS, STEP, node_moments
    from sdr_edge.federated.fleet_rerank import candidate_key, score_key
    from sdr_edge.routing.probe import extract_features
    from sdr_edge.routing.transferability import (
        LABELLED_METHODS,
        RERANK_METHODS,
        TransferabilityError,
        score_candidates,
    )

    config = _config(content)
    method = str(config.get("method", ""))
    if method not in RERANK_METHODS:
        raise ValueError(f"unknown re-rank method {method!r} ({', '.join(RERANK_METHODS)})")
    step = str(config.get(STEP, ""))  # the fleet consensus's exchanges (consensus_exchange)
    if step in NODE_STEPS:
        return NODE_STEPS[step](content, state)
    if step and step != MOMENTS:
        raise ValueError(f"unknown re-rank step {step!r}")
    count = int(config.get("candidates", 0))  # type: ignore[arg-type]
    labelled = method in LABELLED_METHODS
    features = []
    n = 0
    for i in range(count):
        key = candidate_key(i)
        if key not in content.config_records or f"{key}-arrays" not in content.array_records:
            raise ValueError(f"re-rank message lacks candidate {i} of {count}")
        model, spec = model_from_message(content.config_records[key],
                                         content.array_records[f"{key}-arrays"])
        data = node_data(node_config, spec.image_size, spec.channels, need_labels=labelled)
        if labelled and len(np.unique(data.train.labels)) < 2:
            raise NodeDataError(f"re-rank by {method} needs two classes in the training split, "
                                f"this node has {len(np.unique(data.train.labels))}")
        images = data.train.images if labelled else data.all_images()
        features.append(extract_features(model.backbone, images, spec))
        n = len(images)
    if step == MOMENTS:
        log.info("fleet consensus: moments of %d candidate(s) on %d local image(s)", count, n)
        return node_moments(features, state)
    try:
        values = score_candidates(method, features, data.train.labels if labelled else None) \
            if features else []
    except TransferabilityError as exc:
        raise NodeDataError(f"re-rank by {method}: {exc}") from exc
    scores = {score_key(i): v for i, v in enumerate(values)}
    log.info("scored %d candidate(s) by %s on %d local image(s)", count, method, n)
    return RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: n, **scores})})


def _flag(value: object) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def train_config(config: Mapping[str, object]) -> FineTuneConfig:
    """The round's local recipe from the server's ConfigRecord; unset keys take the recipe's
    defaults (FineTuneConfig). The server's round schedule sets lr, warmup-fraction,
    min-lr-fraction and fine-tune per round (sdr_edge.federated.strategy.RoundSchedule). A
    node re-fits the shared head to its own data first (LP-FT probe init) only when
    "probe-init" is true."""
    d = FineTuneConfig()
    return FineTuneConfig(
        epochs=int(config.get("local-epochs", 1)),  # type: ignore[arg-type]
        lr=float(config.get("lr", ROUND_LR)),  # type: ignore[arg-type]
        batch_size=int(config.get("batch-size", d.batch_size)),  # type: ignore[arg-type]
        mode=str(config.get("fine-tune", d.mode)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        seed=int(config.get("server-round", 0)),  # type: ignore[arg-type]
        probe_init=_flag(config.get("probe-init", d.probe_init)),
        schedule=str(config.get("schedule", d.schedule)),
        warmup_fraction=float(config.get("warmup-fraction", d.warmup_fraction)),  # type: ignore[arg-type]
        min_lr_fraction=float(config.get("min-lr-fraction", d.min_lr_fraction)),  # type: ignore[arg-type]
        bn=str(config.get("bn", d.bn)),
        optimizer=str(config.get("optimizer", d.optimizer)),
        backbone_lr_scale=float(config.get("backbone-lr-scale",  # type: ignore[arg-type]
                                           d.backbone_lr_scale)),
        weight_decay=float(config.get("weight-decay", d.weight_decay)),  # type: ignore[arg-type]
        logit_adjust=float(config.get("logit-adjust", d.logit_adjust)),  # type: ignore[arg-type]
    )


def _load_local_bn(model: torch.nn.Module, state: RecordDict | None) -> bool:
    """FedBN: put this node's own BatchNorm layers (kept from its last round) into `model`."""
    if state is None or LOCAL_BN not in state.array_records:
        return False
    saved = state.array_records[LOCAL_BN]
    own = model.state_dict()
    with torch.no_grad():
        for key, arr in saved.items():
            own[key].copy_(torch.from_numpy(np.asarray(arr.numpy())).to(own[key].dtype))
    return True


def train_task(content: RecordDict, node_config: Mapping[str, object],
               state: RecordDict | None = None) -> RecordDict:
    """Fine-tune the received sub-net + head on the node's training split.

    With "fedbn" (Li et al. 2021, FedBN) the node trains with its own BatchNorm layers (the
    received ones only in its first round), keeps them in the run's node state, and sends
    them only when the server asks ("send-bn", the last round, for the bundle's mean).
    """
    config = _config(content)
    model, spec = model_from_message(config, _arrays(content))
    fedbn = _flag(config.get("fedbn", False))
    if fedbn:
        _load_local_bn(model, state)
    data = node_data(node_config, spec.image_size, spec.channels)
    result = train_local(model, data.train.images, data.train.labels, spec, train_config(config),
                         progress=f"round {config.get('server-round', '?')}")
    arrays = model_to_arrays(model)
    if fedbn:
        bn, _ = batchnorm_keys(model)
        if state is not None:
            state[LOCAL_BN] = ArrayRecord({k: arrays[k] for k in bn})
        if not _flag(config.get("send-bn", False)):
            arrays = ArrayRecord({k: v for k, v in arrays.items() if k not in bn})
    return RecordDict({ARRAYS: arrays,
                       METRICS: MetricRecord({"train-loss": float(result.loss),
                                              NUM_EXAMPLES: int(result.num_examples)})})


def evaluate_task(content: RecordDict, node_config: Mapping[str, object],
                  state: RecordDict | None = None) -> RecordDict:
    """Loss and accuracy of the received model on the node's held-out split (under FedBN with
    the node's own BatchNorm layers: the model this device would run)."""
    config = _config(content)
    model, spec = model_from_message(config, _arrays(content))
    if _flag(config.get("fedbn", False)):
        _load_local_bn(model, state)
    data = node_data(node_config, spec.image_size, spec.channels)
    result = evaluate_local(model, data.test.images, data.test.labels, spec)
    return RecordDict({METRICS: MetricRecord({"eval-loss": float(result.loss),
                                              "eval-accuracy": float(result.accuracy),
                                              NUM_EXAMPLES: int(result.num_examples)})})


def bundle_record(files: Mapping[str, bytes]) -> RecordDict:
    """A bundle's files as uint8 arrays (Flower chunks ArrayRecords, so size is no issue)."""
    return RecordDict({FILES: ArrayRecord({name: Array(np.frombuffer(data, dtype=np.uint8).copy())
                                           for name, data in files.items()})})


def receive_bundle_task(content: RecordDict, node_config: Mapping[str, object],
                        state: RecordDict | None = None) -> RecordDict:
    """Keep the server's signed fine-tuned bundle in `bundle-dir` once it verifies.

    A node without `bundle-dir` in its node config keeps nothing (and says so); one with it
    also needs `server-pubkey`, the public key of the federation's signing key.
    """
    from sdr_edge.artifacts.signing import load_public_key
    from sdr_edge.artifacts.transfer import verify_bundle_archive, write_files_atomically

    target = node_config.get("bundle-dir")
    if not target:
        return RecordDict({METRICS: MetricRecord({"saved": 0})})
    pubkey = node_config.get("server-pubkey")
    if not pubkey:
        raise ValueError("node config has bundle-dir but no server-pubkey to verify bundles with")
    if FILES not in content.array_records:
        raise ValueError("bundle message carries no files")
    files = {name: arr.numpy().tobytes() for name, arr in content.array_records[FILES].items()}
    manifest = verify_bundle_archive(files, load_public_key(str(pubkey)))
    out = write_files_atomically(files, str(target))
    log.info("kept the fine-tuned bundle for route %s in %s", manifest.get("route"), out)
    return RecordDict({METRICS: MetricRecord({"saved": 1})})
