"""The signature kit trains from pool batches: a streamed folder pool gives the kit of the
in-memory pool (bitwise, on CPU), and memory does not hold the pool as one float array."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest

from sdr_edge.data.folder import FolderPool
from sdr_edge.data.pool import MemoryPool
from sdr_edge.data.preprocess import InputSpec
from sdr_edge.routing.kit import KIT_JSON, fit_signature_kit, train_signature_kit

BRANCHING = (2, 3)
KW = dict(epochs=2, seed=5, batch_size=16, widths=(4, 8), progress=False)


def _images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _codes(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, b, n) for b in BRANCHING], axis=1)


def _fit(images, codes, spec, **kw):
    net, metrics = fit_signature_kit(images, codes, BRANCHING, spec, **{**KW, **kw})
    metrics.pop("kit_train_seconds")
    return {k: v.numpy() for k, v in net.state_dict().items()}, metrics


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """60 lossless PNGs in two class folders, and the same images decoded into memory."""
    root = tmp_path_factory.mktemp("kitpool")
    images = _images(60, 12, 3)
    for i, im in enumerate(images):
        sub = root / f"c{i % 2}"
        sub.mkdir(exist_ok=True)
        assert cv2.imwrite(str(sub / f"{i:03d}.png"), im)
    pool = FolderPool(root, 12, 3)
    return pool, pool.read(np.arange(len(pool)))


def test_folder_pool_gives_the_in_memory_kit(folder):
    pool, decoded = folder
    spec = InputSpec(12, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    codes = _codes(len(pool))
    w_mem, m_mem = _fit(decoded, codes, spec)  # an array: what the kit took before pools
    before = pool.decoded
    w_folder, m_folder = _fit(pool, codes, spec, workers=1)
    assert pool.decoded == before  # the worker process decoded, not this one
    w_pool, m_pool = _fit(MemoryPool("mem", decoded), codes, spec)
    assert w_mem.keys() == w_folder.keys() == w_pool.keys()
    for key in w_mem:
        np.testing.assert_array_equal(w_mem[key], w_folder[key], err_msg=key)
        np.testing.assert_array_equal(w_mem[key], w_pool[key], err_msg=key)
    assert m_folder == m_mem == m_pool
    assert m_mem["kit_train_images"] == 54 and m_mem["kit_holdout_images"] == 6
    assert "agreement_level2" in m_mem


def test_pool_decoded_larger_is_resized_to_the_spec(folder, tmp_path):
    """A pool decoded above the training size ([data] decode_size) trains the kit at the
    spec's size (the evaluation transform's resize), and the kit files are written."""
    pool, _ = folder
    big = FolderPool(pool.root, 20, 3)
    spec = InputSpec(12, 3, (0.5,) * 3, (0.25,) * 3)
    metrics = train_signature_kit(big, _codes(len(big)), BRANCHING, spec, tmp_path / "kit",
                                  run_id=None, **{**KW, "epochs": 1})
    assert metrics["kit_train_images"] == 54
    assert (tmp_path / "kit" / KIT_JSON).is_file()


def test_kit_never_holds_the_pool_as_one_float_array():
    """Python-traced peak (NumPy's buffers included) stays below a quarter of what the old
    whole-pool float32 conversion alone allocated. A first small fit imports what the first
    optimizer step imports lazily (torch._dynamo: ~40 MB of code objects), outside the trace."""
    n, size = 4000, 16
    images = _images(n, size, 1)
    codes = _codes(n)
    spec = InputSpec(size, 1, (0.5,), (0.25,))
    fit_signature_kit(images[:40], codes[:40], BRANCHING, spec, **{**KW, "epochs": 1})
    whole_float = n * size * size * 4  # 4.1 MB; batches of 128 (80 held out)
    tracemalloc.start()
    try:
        fit_signature_kit(MemoryPool("mem", images), codes, BRANCHING, spec,
                          **{**KW, "epochs": 1, "batch_size": 128, "holdout_fraction": 0.02})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < whole_float / 4, f"traced peak {peak} B vs whole pool as float32 {whole_float} B"
