"""What crosses the Flower wire: weights as ArrayRecords, the model's description as config.

Only floating-point tensors travel (weights and BatchNorm running statistics); integer
bookkeeping such as `num_batches_tracked` stays local, because a weighted average of it is
meaningless. The receiving side rebuilds the model from the architecture JSON, resizes its layers to the
received tensors' shapes (a sub-net pruned by the server keeps the architecture's layout with
fewer channels, as a pruned bundle does) and loads the arrays strictly, so a node never runs a
model it cannot account for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from sdr_edge.data.preprocess import InputSpec
from sdr_edge.models.classifier import SubnetModel

ARCH_KEY = "arch"
SPEC_KEY = "input-spec"
ROUTE_KEY = "route"


def model_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's floating-point state (parameters + BN statistics) as an ArrayRecord."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy().copy())
                        for k, v in model.state_dict().items() if v.is_floating_point()})


def arrays_into_model(model: torch.nn.Module, record: Mapping[str, Array]) -> None:
    """Load an ArrayRecord into `model`; every floating-point tensor must be present and fit."""
    state = model.state_dict()
    expected = {k for k, v in state.items() if v.is_floating_point()}
    missing, unexpected = sorted(expected - set(record)), sorted(set(record) - expected)
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key in expected:
            value = torch.from_numpy(np.asarray(record[key].numpy()))
            if tuple(value.shape) != tuple(state[key].shape):
                raise ValueError(f"weight {key!r} has shape {tuple(value.shape)}, "
                                 f"model expects {tuple(state[key].shape)}")
            state[key].copy_(value.to(state[key].dtype))


def arrays_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays (what one model transfer costs on the wire, roughly)."""
    return int(sum(len(a.data) for a in record.values()))


def describe_model(model: SubnetModel, spec: InputSpec, route: Sequence[int]) -> dict:
    """ConfigRecord entries that let a node rebuild the model and preprocess its data."""
    return {ARCH_KEY: json.dumps(model.arch_dict(), sort_keys=True),
            SPEC_KEY: json.dumps(spec.to_dict(), sort_keys=True),
            ROUTE_KEY: [int(v) for v in route]}


def model_from_config(config: Mapping[str, object]) -> tuple[SubnetModel, InputSpec]:
    """Rebuild the (untrained) model and its input spec from `describe_model`'s entries."""
    try:
        arch = json.loads(str(config[ARCH_KEY]))
        spec = InputSpec.from_dict(json.loads(str(config[SPEC_KEY])))
    except KeyError as exc:
        raise ValueError(f"server config lacks {exc.args[0]!r}: cannot rebuild the model") from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"server config holds a malformed model description: {exc}") from exc
    if not arch.get("num_classes"):
        raise ValueError("the server's model has no classification head")
    return SubnetModel.from_arch_dict(arch), spec


def model_from_message(config: Mapping[str, object], record: Mapping[str, Array]
                       ) -> tuple[SubnetModel, InputSpec]:
    """The server's model: its architecture, its layers' widths from the received weights'
    shapes (`bundle.fit_modules_to_state`, the rule pruned bundles load by), its weights."""
    from sdr_edge.artifacts.bundle import fit_modules_to_state

    model, spec = model_from_config(config)
    shapes = {k: torch.empty(tuple(a.shape), device="meta")  # shapes only, no memory
              for k, a in record.items() if k.endswith("weight")}
    try:
        fit_modules_to_state(model, shapes)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"weights do not fit the model's layers: {exc}") from exc
    arrays_into_model(model, record)
    return model, spec


def config_record(entries: Mapping[str, object]) -> ConfigRecord:
    return ConfigRecord(dict(entries))  # type: ignore[arg-type]


def batchnorm_keys(model: torch.nn.Module) -> tuple[frozenset[str], frozenset[str]]:
    """State keys of every BatchNorm layer (FedBN keeps them on the node), and the subset
    that are running statistics (averaged, never moved by an adaptive server optimiser)."""
    keys, stats = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            for key, value in module.state_dict().items():
                if value.is_floating_point():
                    keys.add(prefix + key)
                    if key in ("running_mean", "running_var"):
                        stats.add(prefix + key)
    return frozenset(keys), frozenset(stats)
