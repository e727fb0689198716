"""Server-side pre-training: config, SimSiam/SiamKD epochs, progressive routing, resume, DDP."""

import os

# Routed stages run each expert on a batch slice whose size changes every step. oneDNN (torch's
# CPU convolutions) caches one compiled primitive per shape, 1024 by default: with 4 routed
# stages x 4 experts x forward/backward the cache thrashes and recompiles. A larger cache takes
# the routed/unified throughput ratio of the tiny config from ~0.75 to ~0.83 (measured with
# benchmarks/train_throughput.py). Read lazily by oneDNN, so setting it here is early enough.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

from sdr_edge.training.config import ConfigError, TrainConfig, load_config  # noqa: E402
from sdr_edge.training.pipeline import RunConflictError, Trainer, TrainResult, train  # noqa: E402

__all__ = ["ConfigError", "RunConflictError", "TrainConfig", "TrainResult", "Trainer",
           "load_config", "train"]
