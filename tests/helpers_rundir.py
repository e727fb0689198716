"""The tests' one builder of tiny but complete run directories (seconds on a CPU).

It writes with the same `sdr_edge.artifacts.run_dir` savers `sdr-server train` uses, so every
loader sees a real run, and experts get distinct weights so that different routes extract
different sub-nets (a freshly initialised SDRnet has identical experts). Two kinds:

- random (default): random SDRnet, teacher, codes and codebooks, fixed TINY_SPEC; for tests
  that need a valid run, not a meaningful one (registry, fetch, Flower, device install).
- clustered: like a real run, the codes are the library's residual k-means on the (untrained)
  teacher's features, the experts are the teacher's stages plus noise, and the spec holds the
  data's own statistics, so a kit trained on the codes has something to learn and routing picks
  a meaningful sub-net (kit and route-eval tests). CLUSTERED holds the parameters those tests'
  thresholds were measured with.

Tests that only read a run share one per session: `shared_tiny_run(base)` or
`shared_tiny_run(base, clustered=True)`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

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
#: The tiny backbone of every run-dir test that does not ask for another (`backbone=`).
TINY_BACKBONE = BackboneConfig.preset("small", in_channels=1, widths=(8, 8, 16, 16),
                                      stem_width=8)
#: Images behind random codes (clustered codes cover all 1,797 digits unless `images=`).
RANDOM_CODES_IMAGES = 128
#: The clustered run of the kit and route-eval tests: their thresholds (kit agreement above the
#: majority code, probe and k-NN accuracies of random-init sub-nets) were measured on it.
CLUSTERED: dict[str, Any] = {
    "branching": (2, 2),
    "backbone": BackboneConfig.preset("small", in_channels=1, widths=(8, 16, 16, 32),
                                      stem_width=8),
    "kit_epochs": 2,
    "kit_widths": (16, 32, 32),
}


# The smallest real `sdr-server train` config (digits, 16 px, K = 4): for tests that run the
# trainer itself rather than build a run dir.
TINY_TRAIN = {
    "data": {"source": "builtin:digits", "image_size": 16, "limit": 200, "val_fraction": 0.2},
    "model": {"widths": [8, 8, 16, 16], "blocks": [1, 1, 1, 1], "stem_width": 8},
    "routing": {"branching": [2, 2]},
    "ssl": {"proj_dim": 16, "pred_hidden": 8, "batch_size": 64},
    "schedule": {"phase0_epochs": 2, "level_epochs": [1, 1]},
    "kit": {"epochs": 0},
    "train": {"threads": 1, "knn_every": 1},
    "augment": {"flip": False},
}


def tiny_train_config(**tables: dict) -> dict:
    """A fresh copy of TINY_TRAIN with the given keys of the given tables replaced."""
    cfg = copy.deepcopy(TINY_TRAIN)
    for table, values in tables.items():
        cfg.setdefault(table, {}).update(values)
    return cfg


def _perturb_experts(net: SDRnet, gen: torch.Generator | None, relative: bool) -> SDRnet:
    """Noise on every expert (0.1, or 0.3 of each tensor's std), so that routes differ."""
    with torch.no_grad():
        for stage in net.stages:
            if isinstance(stage, RoutedStage):
                for expert in stage.experts:
                    for p in expert.parameters():
                        scale = 0.3 * p.std().nan_to_num(0.0) if relative else 0.1
                        p.add_(scale * torch.randn(p.shape, generator=gen))
    return net.eval()


def tiny_sdrnet(seed: int = 0, branching: tuple[int, ...] = TINY_BRANCHING,
                backbone: BackboneConfig = TINY_BACKBONE) -> SDRnet:
    """A random SDRnet with every level active and every expert different."""
    torch.manual_seed(seed)
    net = SDRnet(backbone, branching)
    net.active_levels.fill_(net.levels)
    return _perturb_experts(net, torch.Generator().manual_seed(seed + 1), relative=False)


def _random_run(images: int, branching: tuple[int, ...], backbone: BackboneConfig, seed: int):
    net = tiny_sdrnet(seed, branching, backbone)
    torch.manual_seed(seed + 2)
    teacher = Backbone(backbone).eval()
    gen = torch.Generator().manual_seed(seed + 3)
    books = [torch.nn.functional.normalize(torch.randn(b, net.feature_dim, generator=gen), dim=1)
             for b in branching]
    codes = torch.stack([torch.randint(0, b, (images,), generator=gen) for b in branching], 1)
    return teacher, net, TINY_SPEC, codes, books


def _clustered_run(source, branching: tuple[int, ...], backbone: BackboneConfig, seed: int):
    from sdr_edge.clustering import fit_residual_kmeans
    from sdr_edge.routing.probe import extract_features

    mean, std = source.channel_stats()
    spec = InputSpec(TINY_SPEC.image_size, TINY_SPEC.channels, mean, std, source.label_names)
    torch.manual_seed(seed)
    teacher = Backbone(backbone).eval()
    clusters = fit_residual_kmeans(extract_features(teacher, source.images, spec), branching,
                                   seed=seed, backend="sklearn")  # normalises the features
    net = SDRnet.from_backbone(teacher, branching)
    for r in range(len(branching)):
        net.split_level(r)  # as training activates the levels
    net = _perturb_experts(net, None, relative=True)
    return (teacher, net, spec, torch.from_numpy(clusters.codes),
            [torch.from_numpy(b) for b in clusters.codebooks])


def build_tiny_run(run_dir: str | Path, seed: int = 0, with_kit: bool = True, *,
                   clustered: bool = False, branching: tuple[int, ...] = TINY_BRANCHING,
                   backbone: BackboneConfig = TINY_BACKBONE, images: int | None = None,
                   kit_epochs: int = 1, kit_widths: tuple[int, ...] | None = None) -> Path:
    """Write sdrnet, teacher, codebooks, codes and (unless with_kit=False) a signature kit.

    `images`: how many builtin:digits images the codes and the kit cover (None:
    RANDOM_CODES_IMAGES for random codes, all for clustered ones). The kit is really trained on
    the codes, `kit_epochs` epochs with `kit_widths` (None: the library's default).
    """
    from sdr_edge.data.sources import load_source

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    branching = tuple(branching)
    if images is None and not clustered:
        images = RANDOM_CODES_IMAGES
    source = load_source("builtin:digits", TINY_SPEC.image_size, TINY_SPEC.channels,
                         limit=images, seed=seed)
    if clustered:
        teacher, net, spec, codes, books = _clustered_run(source, branching, backbone, seed)
    else:
        teacher, net, spec, codes, books = _random_run(len(source.images), branching, backbone,
                                                       seed)
    save_sdrnet(run_dir, net, spec)
    save_teacher(run_dir, teacher, spec)
    save_codebooks(run_dir, books)
    save_codes(run_dir, codes, "builtin:digits")
    if with_kit:
        from sdr_edge.routing.kit import train_signature_kit

        widths = {} if kit_widths is None else {"widths": kit_widths}
        train_signature_kit(source.images, codes.numpy(), branching, spec, run_dir / KIT_DIR,
                            epochs=kit_epochs, seed=seed, progress=False, **widths)
    write_run_manifest(run_dir, {"source": "builtin:digits", "tiny": True})
    return run_dir


def shared_tiny_run(base: Path, clustered: bool = False) -> Path:
    """One tiny run per test session and kind (pass `tmp_path_factory.getbasetemp()`); tests
    only read it. The clustered one is built with CLUSTERED."""
    run_dir = Path(base) / ("shared-clustered-run" if clustered else "shared-tiny-run")
    if not (run_dir / "manifest.json").is_file():
        build_tiny_run(run_dir, **(CLUSTERED | {"clustered": True} if clustered else {}))
    return run_dir
