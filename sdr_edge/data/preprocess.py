"""Evaluation-time preprocessing shared by training, signatures and on-device inference.

It imports only NumPy and OpenCV on purpose: the client's signature and inference paths
must run without torch, and a test proves this function is what training evaluates with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: square size, channel count and per-channel normalisation."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(
            image_size=int(d["image_size"]),
            channels=int(d["channels"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            label_names=tuple(str(v) for v in d.get("label_names", ())),
        )


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Return an HxWxC uint8 image with `channels` channels (1 or 3), from gray, BGR or BGRA."""
    if image.ndim == 2:
        image = image[:, :, None]
    have = image.shape[2]
    if have == channels:
        return image
    if have == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        have = 3
        if channels == 3:
            return image
    if have == 3 and channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    raise ValueError(f"cannot convert an image with {have} channels to {channels}")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an HxWxC uint8 image to size x size (area filter down, linear up)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image if image.ndim == 3 else image[:, :, None]
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    out = cv2.resize(image, (size, size), interpolation=interp)
    return out if out.ndim == 3 else out[:, :, None]


def prepare_uint8(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Decoded image of any size/channels -> size x size x channels uint8 (how sources store images)."""
    return resize_image(to_channels(image, channels), size)


def normalize_batch(images_uint8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 N x H x W x C (already at spec size) -> float32 N x C x H x W, normalised."""
    if images_uint8.ndim != 4 or images_uint8.shape[3] != spec.channels:
        raise ValueError(
            f"expected N x H x W x {spec.channels} images, got shape {tuple(images_uint8.shape)}"
        )
    x = images_uint8.astype(np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def normalize_pool_batch(images_uint8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 N x S x S x C from an image pool -> float32 N x C x H x W at the spec's size: the
    evaluation transform of embeddings and the signature kit. S exceeds the spec size when the
    pool decodes larger for random-resized crops ([data] decode_size); such images are resized
    as `prepare_uint8` resizes them."""
    if images_uint8.ndim == 4 and images_uint8.shape[1] != spec.image_size:
        images_uint8 = np.stack([resize_image(im, spec.image_size) for im in images_uint8])
    return normalize_batch(images_uint8, spec)


def preprocess_images(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Decoded images of any size -> the float32 NCHW batch a model takes (the evaluation transform)."""
    batch = np.stack([prepare_uint8(im, spec.image_size, spec.channels) for im in images])
    return normalize_batch(batch, spec)
