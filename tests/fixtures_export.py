"""A tiny *trained* digits classifier and its signed bundle, shared by the export/infer tests.

Trained supervised for a few epochs on builtin:digits at 16 px (seconds on a CPU), so that the
int8 agreement and accuracy checks measure something real. Cached per test process.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import cv2
import torch

from sdr_edge.artifacts.bundle import write_bundle
from sdr_edge.artifacts.signing import generate_keypair, load_private_key
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.data.sources import load_digits_raw, load_source
from sdr_edge.models import Backbone, BackboneConfig, SubnetModel
from sdr_edge.training.finetune import FineTuneConfig, evaluate_local, train_local

SIZE = 16
ROUTE = (1, 0, 2, 3)


def tiny_config() -> BackboneConfig:
    return BackboneConfig.preset("small", in_channels=1, widths=(8, 16, 16, 32), stem_width=8)


@functools.cache
def trained_digits() -> tuple[SubnetModel, InputSpec, float]:
    """(model, input spec, held-out accuracy); deterministic for a given torch build.

    Trained with the library's own fine-tune loop (`train_local`: AdamW, warm-up + cosine),
    from scratch, without augmentation: the 1,400 first images train, the rest is held out."""
    src = load_source("builtin:digits", SIZE, 1)
    mean, std = src.channel_stats()
    spec = InputSpec(SIZE, 1, mean, std, src.label_names)
    torch.manual_seed(0)
    model = SubnetModel(Backbone(tiny_config()), 10)
    n_train = 1400
    cfg = FineTuneConfig(epochs=4, lr=3e-3, batch_size=64, weight_decay=0.0, seed=0,
                         augment=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster on a busy 2-core box
    try:
        train_local(model, src.images[:n_train], src.labels[:n_train], spec, cfg)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    acc = evaluate_local(model, src.images[n_train:], src.labels[n_train:], spec).accuracy
    return model, spec, acc


def features_model() -> SubnetModel:
    """The trained backbone without its head: a features-only sub-net."""
    model, _, _ = trained_digits()
    headless = SubnetModel(copy.deepcopy(model.backbone), None)
    return headless.eval()


def make_keys(folder: Path, name: str = "server"):
    generate_keypair(folder / f"{name}.key", folder / f"{name}.pub")
    return load_private_key(folder / f"{name}.key"), folder / f"{name}.pub"


def make_bundle(folder: Path, model: SubnetModel, spec: InputSpec, key) -> Path:
    return write_bundle(model, folder, ROUTE, spec, key, {"run": "test-export"})


def write_digit_pngs(folder: Path, count: int, start: int = 0, size: int | None = None) -> list[Path]:
    """Digits as PNG files (raw 8x8, or resized to `size`), like images a device would hold."""
    folder.mkdir(parents=True, exist_ok=True)
    raw, labels = load_digits_raw()
    paths = []
    for i in range(start, start + count):
        img = raw[i] if size is None else cv2.resize(raw[i], (size, size),
                                                     interpolation=cv2.INTER_LINEAR)
        path = folder / f"digit_{i:04d}_label{labels[i]}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


