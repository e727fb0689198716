"""The briefly trained classifier that the export benchmarks measure (export_latency,
video_infer): the `small` backbone preset with a 10-class head at 28 x 28 x 1, supervised
on Fashion-MNIST, so that int8's agreement and accuracy checks judge a real classifier.

Kept here rather than in `sdr_edge`: it is a benchmark fixture (one data set, one recipe).
Plain Adam at a constant rate on the global torch RNG, not `sdr_edge.training.finetune`
(AdamW + cosine + augmentation, its own generator): that recipe would train other weights
than the ones the published figures of both benchmarks were measured on.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdr_edge.data.preprocess import InputSpec, normalize_batch
from sdr_edge.data.sources import load_source
from sdr_edge.models import Backbone, BackboneConfig, SubnetModel

SIZE = 28
BATCH = 128


def train_small_classifier(n_train: int, epochs: int, seed: int,
                           progress: bool = True) -> tuple[SubnetModel, InputSpec]:
    """(model in eval mode, its input spec) after `epochs` over `n_train` training images."""
    src = load_source("fashion-mnist:train", SIZE, 1, limit=n_train, seed=seed)
    mean, std = src.channel_stats()
    spec = InputSpec(SIZE, 1, mean, std, src.label_names)
    x = torch.from_numpy(normalize_batch(src.images, spec))
    y = torch.from_numpy(src.labels)
    n = len(y)
    torch.manual_seed(seed)
    model = SubnetModel(Backbone(BackboneConfig.preset("small", in_channels=1)), 10)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    bar = tqdm(total=epochs * ((n + BATCH - 1) // BATCH), desc=f"train small@{SIZE}px",
               file=sys.stderr, disable=not progress)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval(), spec
