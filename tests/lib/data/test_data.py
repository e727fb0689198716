"""Data sources: image folders (labels, nesting, mixed sizes, gray/colour, corrupt files),
builtin:digits, Fashion-MNIST errors, and the evaluation transform."""

import gzip

import cv2
import numpy as np
import pytest

from sdr_edge.data import InputSpec, load_source, normalize_batch, preprocess_images
from sdr_edge.data.sources import FASHION_MNIST_DIR


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _pattern(h, w, c, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)
    return image


@pytest.fixture
def folder(tmp_path):
    """Two classes, nested sub-folders, mixed sizes and formats, gray and colour, 3 bad files."""
    root = tmp_path / "imgs"
    _write(root / "cat" / "a.png", _pattern(40, 30, 3, 0))
    _write(root / "cat" / "deep" / "er" / "b.jpg", _pattern(12, 50, 3, 1))
    _write(root / "cat" / "c.bmp", _pattern(28, 28, 1, 2))
    _write(root / "dog" / "d.png", _pattern(64, 64, 1, 3))
    _write(root / "dog" / "e.png", _pattern(9, 7, 3, 4))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "truncated.jpg").write_bytes(cv2.imencode(".jpg", _pattern(32, 32, 3, 5))[1]
                                                 .tobytes()[:40])
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_with_class_subfolders_mixed_sizes_and_corrupt_files(folder):
    src = load_source(str(folder), image_size=16, channels=3)
    assert src.images.shape == (5, 16, 16, 3) and src.images.dtype == np.uint8
    assert src.label_names == ("cat", "dog")
    assert sorted(src.labels.tolist()) == [0, 0, 0, 1, 1]
    assert len(src.skipped) == 3
    assert {p.rsplit("/", 1)[1] for p in src.skipped} == {"broken.png", "empty.jpg", "truncated.jpg"}


def test_gray_and_colour_conversions(folder):
    gray = load_source(str(folder), image_size=8, channels=1)
    assert gray.images.shape == (5, 8, 8, 1)
    colour = load_source(str(folder / "dog"), image_size=8, channels=3)
    assert colour.images.shape == (2, 8, 8, 3)
    # a grayscale file read as colour repeats its channel
    single = load_source(str(folder / "cat"), image_size=28, channels=3)
    gray_rows = [im for im in single.images if np.array_equal(im[..., 0], im[..., 2])
                 and np.array_equal(im[..., 0], im[..., 1])]
    assert len(gray_rows) >= 1


def test_folder_without_class_subfolders_has_no_labels(tmp_path):
    _write(tmp_path / "x" / "a.png", _pattern(10, 10, 1, 0))
    _write(tmp_path / "x" / "b.png", _pattern(10, 10, 1, 1))
    src = load_source(str(tmp_path / "x"), image_size=8)
    assert src.labels is None and len(src) == 2


def test_source_without_readable_image_names_the_path(tmp_path):
    bad = tmp_path / "nothing_here"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable image under .*nothing_here"):
        load_source(str(bad), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_source(str(empty), image_size=8)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_source(str(tmp_path / "does_not_exist"), image_size=8)
    with pytest.raises(ValueError, match="builtin:digits"):
        load_source("builtin:nope", image_size=8)


def test_fashion_mnist_missing_dir_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SDR_FASHION_MNIST_DIR", str(tmp_path / "no-fmnist"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as info:
        load_source("fashion-mnist", image_size=28)
    assert "no-fmnist" in str(info.value)
    with pytest.raises(ValueError, match="split"):
        load_source("fashion-mnist:validation", image_size=28)


def test_fashion_mnist_reads_idx_files_from_env_dir(tmp_path, monkeypatch):
    """A small IDX pair written here, read through SDR_FASHION_MNIST_DIR (as Debian ships)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.arange(6, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (6).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                    + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (6).to_bytes(4, "big") + labels.tobytes())
    monkeypatch.setenv("SDR_FASHION_MNIST_DIR", str(tmp_path))
    train = load_source("fashion-mnist:train", image_size=28)
    assert np.array_equal(train.images[..., 0], images) and train.labels.tolist() == labels.tolist()
    both = load_source("fashion-mnist", image_size=14, limit=5, seed=1)
    assert both.images.shape == (5, 14, 14, 1) and len(both.label_names) == 10


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist(monkeypatch):
    monkeypatch.delenv("SDR_FASHION_MNIST_DIR", raising=False)
    src = load_source("fashion-mnist:test", image_size=28, limit=50, seed=0)
    assert src.images.shape == (50, 28, 28, 1) and src.labels.max() < 10


def test_builtin_digits_and_seeded_limit():
    full = load_source("builtin:digits", image_size=16)
    assert full.images.shape == (1797, 16, 16, 1) and set(full.labels.tolist()) == set(range(10))
    a = load_source("builtin:digits", image_size=16, limit=100, seed=3)
    b = load_source("builtin:digits", image_size=16, limit=100, seed=3)
    c = load_source("builtin:digits", image_size=16, limit=100, seed=4)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert len(a) == 100


def test_eval_transform_matches_normalize_batch_and_checks_shape():
    src = load_source("builtin:digits", image_size=16, limit=20)
    mean, std = src.channel_stats()
    spec = InputSpec(16, 1, mean, std)
    x = normalize_batch(src.images, spec)
    assert x.shape == (20, 1, 16, 16) and x.dtype == np.float32
    assert abs(float(x.mean())) < 0.2
    raw = [im[..., 0] for im in src.images]  # 2-D gray images, as cv2 decodes them
    assert np.allclose(preprocess_images(raw, spec), x)
    with pytest.raises(ValueError, match="expected N x H x W x 1"):
        normalize_batch(np.zeros((2, 16, 16, 3), np.uint8), spec)
