"""configs/imagenet.toml's memory and disk comment is what sdr_edge.training.estimate computes
from that config, and the estimate's terms follow the code's buffers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdr_edge.clustering import embedding_store as es
from sdr_edge.training.config import load_config, parse_config_text
from sdr_edge.training.estimate import comment_block, estimate

ROOT = Path(__file__).resolve().parents[3]
IMAGENET = ROOT / "configs" / "imagenet.toml"


def test_imagenet_comment_is_the_computed_estimate():
    e = estimate(load_config(IMAGENET), 1_281_167, 8)
    assert comment_block(e) in IMAGENET.read_text(encoding="utf-8")
    assert e.embeddings_disk == 1_281_167 * 2048 * 2 == es.embeddings_bytes(1_281_167, 2048)
    assert e.fit_rows == 262_144 and e.feature_dim == 2048
    assert e.per_rank < 0.01 * e.old_pool_per_rank  # streaming: no decoded pool per rank


def test_terms_follow_the_config(tmp_path):
    base = """
[data]
image_size = 32
channels = 3
val_fraction = 0.1
{extra}
[model]
widths = [8, 8, 16, 16]
[routing]
branching = [4, 4]
[schedule]
level_epochs = [1, 1]
[ssl]
batch_size = 64
[cluster]
sample = 500
"""
    small = estimate(parse_config_text(base.format(extra="")), 10_000, 2)
    limited = estimate(parse_config_text(base.format(extra="limit = 1000\nworkers = 2")), 10_000, 2)
    assert small.images == 10_000 and limited.images == 1_000
    assert small.codes == 10_000 * 2 * 8 and small.fit_rows == 500
    assert small.embeddings_disk == 10_000 * 16 * 2  # D = the last stage's width
    # 2 workers x 2 prefetch + the batch in use, 32 images per rank at 32 x 32 x 3 B
    assert limited.train_batches == 5 * 32 * 32 * 32 * 3
    path = tmp_path / "e.npy"  # the memory map's real size is the formula plus its header
    es.create(path, 1000, 16)
    assert 0 <= path.stat().st_size - estimate(
        parse_config_text(base.format(extra="limit = 1000")), 10_000, 1).embeddings_disk < 4096
    assert np.load(path, mmap_mode="r").shape == (1000, 16)
