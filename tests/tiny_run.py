"""Build a tiny but complete run directory in seconds, with the run-dir writers themselves.

The teacher is an untrained small backbone, codes come from the library's residual k-means on
its features (as `sdr-server train` computes them), and each SDRnet expert is the teacher's
stage plus a little noise, so sub-nets differ. The signature kit is really trained on those
codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdr_edge.artifacts.run_dir import (
    KIT_DIR,
    save_codebooks,
    save_codes,
    save_sdrnet,
    save_teacher,
    write_run_manifest,
)
from sdr_edge.clustering import fit_residual_kmeans
from sdr_edge.data import InputSpec, load_source
from sdr_edge.models import Backbone, BackboneConfig
from sdr_edge.models.sdrnet import RoutedStage, SDRnet
from sdr_edge.routing.kit import train_signature_kit
from sdr_edge.routing.probe import extract_features

TINY_CFG = BackboneConfig.preset("small", in_channels=1, widths=(8, 16, 16, 32), stem_width=8)


def make_tiny_run(run_dir: Path, branching: tuple[int, ...] = (2, 2), image_size: int = 16,
                  kit_epochs: int = 2, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Write a run dir for builtin:digits; returns (run_dir, codes)."""
    torch.manual_seed(seed)
    src = load_source("builtin:digits", image_size)
    mean, std = src.channel_stats()
    spec = InputSpec(image_size, 1, mean, std, src.label_names)
    teacher = Backbone(TINY_CFG).eval()
    clusters = fit_residual_kmeans(extract_features(teacher, src.images, spec), branching,
                                   seed=seed, backend="sklearn")  # normalises the features itself
    codes, books = clusters.codes, clusters.codebooks
    net = SDRnet.from_backbone(teacher, branching)
    for r in range(len(branching)):
        net.split_level(r)
    with torch.no_grad():
        for stage in net.stages:
            if isinstance(stage, RoutedStage):
                for expert in stage.experts:
                    for p in expert.parameters():
                        p.add_(0.3 * p.std().nan_to_num(0.0) * torch.randn_like(p))
    net.eval()
    save_teacher(run_dir, teacher, spec)
    save_sdrnet(run_dir, net, spec)
    save_codebooks(run_dir, [torch.from_numpy(b) for b in books])
    save_codes(run_dir, torch.from_numpy(codes), "builtin:digits")
    train_signature_kit(src.images, codes, branching, spec, run_dir / KIT_DIR,
                        epochs=kit_epochs, seed=seed, progress=False, widths=(16, 32, 32))
    write_run_manifest(run_dir, {"source": "builtin:digits"})
    return run_dir, codes
