"""Self-supervised learning: SimSiam heads and loss, SiamKD distillation, kNN monitor."""

from sdr_edge.ssl.heads import SimSiamHeads
from sdr_edge.ssl.knn import knn_accuracy
from sdr_edge.ssl.losses import negative_cosine, siamkd_loss, simsiam_loss

__all__ = ["SimSiamHeads", "knn_accuracy", "negative_cosine", "siamkd_loss", "simsiam_loss"]
