"""Data: named sources, OpenCV folders, batch augmentations and the shared eval preprocessing."""

from sdr_edge.data.preprocess import InputSpec, normalize_batch, preprocess_images
from sdr_edge.data.sources import ImageSource, load_source

__all__ = ["ImageSource", "InputSpec", "load_source", "normalize_batch", "preprocess_images"]
