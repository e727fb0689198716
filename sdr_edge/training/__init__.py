"""Server-side pre-training: config, SimSiam/SiamKD epochs, progressive routing, resume, DDP."""

from sdr_edge.training.config import ConfigError, TrainConfig, load_config
from sdr_edge.training.pipeline import RunConflictError, Trainer, TrainResult, train

__all__ = ["ConfigError", "RunConflictError", "TrainConfig", "TrainResult", "Trainer",
           "load_config", "train"]
