"""The image pools: a streamed folder or shard pool yields exactly the batches of the in-memory
pool for the same data and seed, ranks decode disjoint shares, `[data] limit` decodes only what
it keeps, and unreadable files are counted, not fatal."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from sdr_edge.data.folder import FolderPool
from sdr_edge.data.pool import ImagePool, MemoryPool, channel_stats, iter_batches, open_pool
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.data.shards import ShardPool, write_shards
from sdr_edge.data.sources import load_source
from sdr_edge.training.config import DataConfig
from sdr_edge.training.distributed import DistEnv
from sdr_edge.training.epochs import EpochPlan, rank_order

N_PER_CLASS = 18


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three class folders of small colour images of mixed sizes, PNG and JPEG."""
    root = tmp_path_factory.mktemp("pool") / "images"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "owl"):
        (root / c).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            h, w = int(rng.integers(14, 30)), int(rng.integers(14, 30))
            image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            ext = ".png" if i % 2 else ".jpg"
            ok, data = cv2.imencode(ext, image)
            assert ok
            (root / c / f"{i:03d}{ext}").write_bytes(data.tobytes())
    return root


def _plan(pool: ImagePool, seed: int = 5) -> EpochPlan:
    spec = InputSpec(16, 3, (0.5,) * 3, (0.25,) * 3)
    return EpochPlan(pool, np.arange(len(pool)), spec, global_batch=8, seed=seed, phase_id=0)


def _epoch(pool: ImagePool, epoch: int, env: DistEnv, workers: int = 0) -> list[np.ndarray]:
    mine, per_rank, steps = rank_order(_plan(pool), epoch, env)
    out = [b.numpy() for _, b in iter_batches(pool, mine, per_rank, workers=workers)]
    assert len(out) == steps
    return out


def test_folder_pool_yields_the_memory_pool_batches(folder):
    memory = MemoryPool.from_source(load_source(str(folder), 16, 3, limit=40, seed=2))
    streamed = FolderPool(folder, 16, 3, limit=40, seed=2)
    assert isinstance(streamed, ImagePool) and len(streamed) == len(memory) == 40
    assert np.array_equal(streamed.labels, memory.labels)
    assert streamed.label_names == memory.label_names == ("cat", "dog", "owl")
    env = DistEnv()
    for epoch in (0, 3):
        expected = _epoch(memory, epoch, env)
        for workers in (0, 2):
            got = _epoch(streamed, epoch, env, workers)
            assert len(got) == len(expected) == 5
            assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not np.array_equal(_epoch(memory, 0, env)[0], _epoch(memory, 1, env)[0])
    assert channel_stats(streamed, np.arange(40)) == channel_stats(memory, np.arange(40))


def test_two_ranks_decode_disjoint_shares(folder):
    seen = []
    for rank in (0, 1):
        pool = FolderPool(folder, 16, 3)
        env = DistEnv(rank=rank, world_size=2)
        mine, per_rank, steps = rank_order(_plan(pool), 1, env)
        assert per_rank == 4 and len(mine) == steps * 4
        for _ in iter_batches(pool, mine, per_rank):
            pass
        assert pool.decoded == len(mine)  # this rank decoded its share and nothing else
        seen.append(set(mine.tolist()))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == (len(pool) // 8) * 8  # every full global batch


def test_limit_decodes_only_what_it_keeps(folder):
    pool = FolderPool(folder, 16, 3, limit=10, seed=4)
    assert pool.decoded == 0 and len(pool) == 10  # the scan lists files, decodes none
    channel_stats(pool, np.arange(len(pool)))
    assert pool.decoded == 10
    kept = {str(pool.path(i)) for i in range(len(pool))}
    reference = load_source(str(folder), 16, 3, limit=10, seed=4)
    assert np.array_equal(pool.read(np.arange(10)), reference.images)
    assert len(kept) == 10 and pool.decoded == 20
    cfg = DataConfig(source=str(folder), image_size=16, channels=3, limit=10, decode_size=24)
    opened = open_pool(cfg, seed=4)
    assert isinstance(opened, FolderPool) and opened.size == 24 and opened.decoded == 0


def test_shard_pool_equals_the_folder_pool(folder, tmp_path, capsys):
    from sdr_edge_server.cli import main

    out = tmp_path / "shards"
    assert main(["shards", str(folder), "--out", str(out), "--shard-size", "16"]) == 0
    assert f"--data shards:{out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir())[:2] == ["index.json", "index.npy"]
    assert len(list(out.glob("shard-*.tar"))) == -(-3 * N_PER_CLASS // 16)
    shards = open_pool(DataConfig(source=f"shards:{out}", image_size=16, channels=3, limit=30),
                       seed=1)
    streamed = FolderPool(folder, 16, 3, limit=30, seed=1)
    assert isinstance(shards, ShardPool)
    assert np.array_equal(shards.labels, streamed.labels)
    assert shards.label_names == streamed.label_names
    env = DistEnv()
    for workers in (0, 2):
        got, expected = _epoch(shards, 2, env, workers), _epoch(streamed, 2, env)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    # the shards are a WebDataset layout: KEY.jpg/.png with KEY.cls per sample
    import tarfile

    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.jpg", "000000000.cls"]
    # a second write into the same folder is refused; nothing there is touched
    before = sorted(p.name for p in out.iterdir())
    assert main(["shards", str(folder), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_unreadable_file_reads_black_and_is_counted(folder, tmp_path):
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    for src in sorted((folder / "cat").iterdir())[:6]:
        (root / "a" / src.name).write_bytes(src.read_bytes())
    good = sorted((root / "a").iterdir())[0].read_bytes()
    (root / "a" / "zz_cut.jpg").write_bytes(good[: len(good) // 3] if good[:2] == b"\xff\xd8"
                                            else b"\xff\xd8broken")
    pool = FolderPool(root, 16, 3)
    assert len(pool) == 7
    batches = list(iter_batches(pool, np.arange(7), 4, workers=1))  # found inside a worker
    assert not batches[1][1][-1].any()  # the unreadable image is black
    assert pool.skipped == [str(root / "a" / "zz_cut.jpg")]
    write_shards(root, tmp_path / "s", shard_size=3)
    shards = ShardPool(tmp_path / "s", 16, 3)
    assert np.array_equal(shards.read(np.arange(7)), pool.read(np.arange(7)))
    assert len(shards.skipped) == 1


def test_bad_shard_index_is_one_line(tmp_path):
    from sdr_edge.data.folder import SourceError

    with pytest.raises(FileNotFoundError, match="no shard index"):
        ShardPool(tmp_path, 16, 1)
    (tmp_path / "index.json").write_text('{"format": "other"}')
    np.save(tmp_path / "index.npy", np.zeros((1, 4), np.int64))
    with pytest.raises(SourceError, match="not a shard index of sdr-edge"):
        ShardPool(tmp_path, 16, 1)
