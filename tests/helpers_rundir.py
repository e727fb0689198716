"""A tiny but complete run directory built in well under a second, for registry/Flower tests.

It is written with the same `sdr_edge.artifacts.run_dir` savers `sdr-server train` uses, so
every loader sees a real run. Experts are given distinct random weights so that different
routes extract different sub-nets (a freshly initialised SDRnet has identical experts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdr_edge.artifacts.run_dir import (
    KIT_DIR,
    save_codebooks,
    save_codes,
    save_sdrnet,
    save_teacher,
    write_run_manifest,
)
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.models.resnet import Backbone, BackboneConfig
from sdr_edge.models.sdrnet import RoutedStage, SDRnet

TINY_BRANCHING = (4, 4, 4, 4)
TINY_SPEC = InputSpec(16, 1, (0.5,), (0.25,), tuple("0123456789"))


def tiny_config() -> BackboneConfig:
    return BackboneConfig.preset("small", in_channels=1, widths=(8, 8, 16, 16), stem_width=8)


def tiny_sdrnet(seed: int = 0) -> SDRnet:
    """A random SDRnet with every level active and every expert different."""
    torch.manual_seed(seed)
    net = SDRnet(tiny_config(), TINY_BRANCHING)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for stage in net.stages:
            if isinstance(stage, RoutedStage):
                for expert in stage.experts:
                    for p in expert.parameters():
                        p.add_(0.1 * torch.randn(p.shape, generator=gen))
    net.active_levels.fill_(net.levels)
    return net.eval()


def build_tiny_run(run_dir: str | Path, seed: int = 0, with_kit: bool = True) -> Path:
    """Write sdrnet, teacher, codebooks, codes and (unless with_kit=False) a signature kit."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    net = tiny_sdrnet(seed)
    save_sdrnet(run_dir, net, TINY_SPEC)
    torch.manual_seed(seed + 2)
    teacher = Backbone(tiny_config()).eval()
    save_teacher(run_dir, teacher, TINY_SPEC)
    gen = torch.Generator().manual_seed(seed + 3)
    dim = net.feature_dim
    save_codebooks(run_dir, [torch.nn.functional.normalize(torch.randn(b, dim, generator=gen), dim=1)
                             for b in TINY_BRANCHING])
    n_images = 128
    codes = torch.stack([torch.randint(0, b, (n_images,), generator=gen) for b in TINY_BRANCHING],
                        1)
    save_codes(run_dir, codes, "builtin:digits")
    if with_kit:
        build_tiny_kit(run_dir, codes, seed)
    write_run_manifest(run_dir, {"source": "builtin:digits", "tiny": True})
    return run_dir


def shared_tiny_run(base: Path) -> Path:
    """One tiny run per test session (pass `tmp_path_factory.getbasetemp()`): built once."""
    run_dir = Path(base) / "shared-tiny-run"
    if not (run_dir / "manifest.json").is_file():
        build_tiny_run(run_dir)
    return run_dir


def build_tiny_kit(run_dir: Path, codes: torch.Tensor, seed: int = 0) -> Path:
    """A real signature kit (one epoch on builtin:digits, exported to ONNX) in RUN_DIR/kit."""
    from sdr_edge.data.sources import load_source
    from sdr_edge.routing.kit import train_signature_kit

    source = load_source("builtin:digits", TINY_SPEC.image_size, TINY_SPEC.channels,
                         limit=codes.shape[0], seed=seed)
    train_signature_kit(source.images, codes.numpy(), TINY_BRANCHING, TINY_SPEC,
                        run_dir / KIT_DIR, epochs=1, seed=seed, progress=False)
    return run_dir / KIT_DIR
