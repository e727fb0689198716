"""Nodes that lie: wrap a ClientApp so some nodes return corrupted weights after training.

Robust aggregation is only worth its cost if it holds against a bad node, so the benchmark
and the tests need one. The attacks are the usual ones from the Byzantine-robust FL
literature (Blanchard et al. 2017; Fang et al. 2020): the honest update scaled up, random
weights with the honest tensors' spread, and non-finite values (which every strategy must
refuse before averaging).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType

ATTACKS = ("scale", "random", "nan")
ARRAYS = "arrays"


def corrupt(record: ArrayRecord, attack: str, rng: np.random.Generator,
            scale: float = 10.0) -> ArrayRecord:
    """The same keys and shapes, poisoned values."""
    out = {}
    for key, arr in record.items():
        value = np.asarray(arr.numpy())
        if value.dtype.kind != "f":
            out[key] = arr
            continue
        if attack == "scale":
            bad = value * scale
        elif attack == "random":
            bad = rng.normal(0.0, float(value.std()) + 1e-3, value.shape)
        elif attack == "nan":
            bad = value.copy()
            bad.reshape(-1)[0] = np.nan
        else:
            raise ValueError(f"unknown attack {attack!r} (one of {ATTACKS})")
        out[key] = Array(np.asarray(bad, dtype=value.dtype))
    return ArrayRecord(out)


class ByzantineApp:
    """Calls `app` like a SuperNode would; nodes whose partition-id is in `bad` poison their
    training replies with `attack`. Everything else (queries, evaluation) stays honest."""

    def __init__(self, app: Callable[[Message, Context], Message], bad: set[int],
                 attack: str = "scale", seed: int = 0) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r} (one of {ATTACKS})")
        self.app, self.bad, self.attack = app, set(bad), attack
        self.rng = np.random.default_rng(seed)

    def __call__(self, message: Message, context: Context) -> Message:
        reply = self.app(message, context)
        partition = int(context.node_config.get("partition-id", -1))  # type: ignore[arg-type]
        if (message.metadata.message_type == MessageType.TRAIN and partition in self.bad
                and not reply.has_error() and ARRAYS in reply.content.array_records):
            reply.content[ARRAYS] = corrupt(reply.content.array_records[ARRAYS], self.attack,
                                            self.rng)
        return reply
