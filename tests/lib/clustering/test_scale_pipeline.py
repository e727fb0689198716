"""The cluster phase on a streamed folder pool: its float16 embeddings memory map equals the
old in-RAM float32 embeddings to float16 precision, and its codes are the in-memory pool's."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.data.pool import MemoryPool
from sdr_edge.data.preprocess import normalize_batch
from sdr_edge.models.resnet import Backbone
from sdr_edge.training.config import parse_config_text
from sdr_edge.training.pipeline import EMBEDDINGS, Trainer

CONFIG = """
[data]
source = "{root}"
image_size = 12
channels = 3
val_fraction = 0.1
[model]
widths = [4, 4, 8, 8]
stem_width = 4
[routing]
branching = [2, 2]
[ssl]
batch_size = 16
[schedule]
level_epochs = [1, 1]
[cluster]
backend = "sklearn"
[train]
device = "cpu"
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clusterpool")
    rng = np.random.default_rng(0)
    for i in range(90):
        base = rng.integers(0, 256, 3)  # a colour per image: embeddings with some structure
        im = np.clip(base + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
        sub = root / f"c{i % 3}"
        sub.mkdir(exist_ok=True)
        assert cv2.imwrite(str(sub / f"{i:03d}.png"), im)
    return root


def _trainer(root, run_dir) -> Trainer:
    trainer = Trainer(parse_config_text(CONFIG.format(root=root)), run_dir)
    trainer._load_data()
    return trainer


def test_folder_pool_clusters_like_the_in_memory_pool(folder, tmp_path):
    torch.manual_seed(0)
    teacher = Backbone(_trainer(folder, tmp_path / "x").cfg.backbone_config()).eval()

    streamed = _trainer(folder, tmp_path / "streamed")
    assert type(streamed.pool).__name__ == "FolderPool"
    images = streamed.pool.read(np.arange(len(streamed.pool)))
    emb = np.asarray(streamed._embed_all(teacher))
    assert (tmp_path / "streamed" / rd.WORK_DIR / EMBEDDINGS).is_file()
    with torch.no_grad():  # the old path: one float32 tensor of every image's features
        old = torch.nn.functional.normalize(
            teacher(torch.from_numpy(normalize_batch(images, streamed.spec))), dim=1).numpy()
    assert emb.dtype == np.float16 and emb.shape == old.shape
    np.testing.assert_allclose(emb.astype(np.float32), old, rtol=2e-3, atol=1e-3)

    in_memory = _trainer(folder, tmp_path / "memory")
    in_memory.pool = MemoryPool("mem", images, streamed.pool.labels,
                                tuple(streamed.pool.label_names))
    codes_mem = in_memory._cluster(teacher)
    codes_streamed = streamed._cluster(teacher)
    assert codes_streamed.shape == (90, 2)
    torch.testing.assert_close(codes_streamed, codes_mem, rtol=0, atol=0)
    assert not (tmp_path / "streamed" / rd.WORK_DIR / EMBEDDINGS).exists()  # scratch removed
    saved, _ = rd.load_codes(tmp_path / "streamed")
    torch.testing.assert_close(saved, codes_streamed, rtol=0, atol=0)
