"""Clustering at pool scale: float16 embeddings memory map, k-means fitted on a sample and
assigned chunk by chunk, the same codes as the in-RAM path, bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from sdr_edge.clustering import ClusteringError, assign_codes, fit_residual_kmeans
from sdr_edge.clustering import embedding_store as es
from sdr_edge.clustering.streamed import fit_sample_assign_chunks, sample_rows


def _blobs(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """Hierarchical blobs (4 coarse x 4 fine), L2-normalised like teacher embeddings."""
    rng = np.random.default_rng(seed)
    coarse, fine = 10.0 * np.eye(d)[:4], 3.0 * np.eye(d)[4:8]
    x = coarse[rng.integers(0, 4, n)] + fine[rng.integers(0, 4, n)]
    x = x + rng.normal(scale=0.3, size=x.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _old_path(x: np.ndarray, rows: np.ndarray, branching, seed: int) -> np.ndarray:
    """What the cluster phase did before: fit on x[rows] in RAM, assign all, fit codes on rows."""
    result = fit_residual_kmeans(x[rows], branching, iters=20, seed=seed, backend="sklearn")
    codes = assign_codes(x, result.codebooks)
    codes[rows] = result.codes
    return codes


@pytest.mark.parametrize("chunk_rows", [65536, 97])
def test_codes_equal_the_in_ram_path(chunk_rows):
    x = _blobs(600)
    rows = np.sort(np.random.default_rng(3).choice(600, 540, replace=False))
    old = _old_path(x, rows, (4, 4), seed=2)
    new = fit_sample_assign_chunks(x, (4, 4), rows=rows, iters=20, seed=2, backend="sklearn",
                                   chunk_rows=chunk_rows, size_rows=rows)
    np.testing.assert_array_equal(new.codes, old)
    np.testing.assert_array_equal(new.fit_rows, rows)
    assert new.sizes == [np.bincount(old[rows, r], minlength=4).tolist() for r in range(2)]
    recon = sum(b[new.codes[:, r]] for r, b in enumerate(new.fit.codebooks))
    assert new.residual == pytest.approx(float(((x - recon) ** 2).sum(1).mean()), rel=1e-5)


def test_codes_from_the_float16_memory_map(tmp_path):
    x = _blobs(500, seed=1)
    path = tmp_path / "emb.f16.npy"
    es.create(path, len(x), x.shape[1])
    rows = es.open_rows(path)
    order = np.random.default_rng(0).permutation(len(x))
    for part in np.array_split(order, 3):  # rows written in any order, as ranks do
        es.write_rows(rows, part, x[part])
    rows.flush()
    del rows
    mm = es.open_rows(path, "r")
    assert isinstance(mm, np.memmap) and mm.dtype == np.float16 and mm.shape == x.shape
    np.testing.assert_allclose(mm, x, rtol=1e-3, atol=1e-3)  # float16: 11 significant bits
    assert path.stat().st_size - es.embeddings_bytes(*x.shape) < 4096  # N x D x 2 + header
    got = fit_sample_assign_chunks(mm, (4, 4), iters=20, seed=0, backend="sklearn", chunk_rows=64)
    want = _old_path(np.asarray(mm, dtype=np.float32), np.arange(len(x)), (4, 4), seed=0)
    np.testing.assert_array_equal(got.codes, want)


def test_unwritten_rows_are_refused(tmp_path):
    path = tmp_path / "emb.f16.npy"
    es.create(path, 300, 16)
    rows = es.open_rows(path)
    es.write_rows(rows, np.arange(299), _blobs(299))  # one rank's row never written
    rows.flush()
    with pytest.raises(ClusteringError, match="NaN"):
        fit_sample_assign_chunks(es.open_rows(path, "r"), (4,), rows=np.arange(100),
                                 backend="sklearn")


def test_sample_is_seeded_and_within_rows():
    rows = np.arange(10, 1000, 3)
    a, b = sample_rows(rows, 50, seed=4), sample_rows(rows, 50, seed=4)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 50 and np.isin(a, rows).all() and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(sample_rows(rows, None, 0), rows)


def test_memory_is_bounded_by_sample_and_chunk(tmp_path):
    """Traced peak (NumPy buffers included) far below the whole float32 array the in-RAM path
    held twice (input and residual): only the sample and one chunk are float32."""
    n, d = 120_000, 32
    path = tmp_path / "emb.f16.npy"
    mm = es.create(path, n, d)
    for start in range(0, n, 20_000):
        es.write_rows(mm, np.arange(start, start + 20_000), _blobs(20_000, d, seed=start))
    mm.flush()
    del mm
    emb = es.open_rows(path, "r")
    whole = n * d * 4  # 15.4 MB
    tracemalloc.start()
    try:
        out = fit_sample_assign_chunks(emb, (4, 4), sample=3000, iters=10, seed=0,
                                       backend="sklearn", chunk_rows=2048)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out.fit_rows) == 3000 and out.codes.shape == (n, 2)
    # the codes themselves are N x R int64 (1.9 MB): what must grow with N
    assert peak < whole / 4, f"traced peak {peak} B vs whole float32 {whole} B"
    # and within sdr_edge.training.estimate's clustering term (4 samples, 3 chunks, the codes)
    assert peak <= 4 * 3000 * d * 4 + 3 * 2048 * d * 4 + n * 2 * 8
