"""Image sources by name: `builtin:digits`, `fashion-mnist[:train|:test]`, `glyphs:SCRIPTS`,
a mixed pool `mix:PART+PART`, or a folder path.

Every source yields uint8 images already at the configured size and channel count, so the
training loop and the evaluation transform never resize again.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdr_edge.data import glyphs
from sdr_edge.data.folder import SourceError, scan_folder
from sdr_edge.data.preprocess import prepare_uint8

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass
class ImageSource:
    """A loaded data set: N x H x W x C uint8 images, optional labels, and what was skipped."""

    name: str
    images: np.ndarray
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] = ()
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def subset(self, index: np.ndarray, name: str | None = None) -> ImageSource:
        """The same source restricted to `index` (labels follow)."""
        labels = None if self.labels is None else self.labels[index]
        return ImageSource(name or self.name, self.images[index], labels, self.label_names)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std in [0, 1] units, for the normalisation in the input spec."""
        x = self.images.reshape(-1, self.channels).astype(np.float64) / 255.0
        std = np.maximum(x.std(axis=0), 1e-3)
        return tuple(float(v) for v in x.mean(axis=0)), tuple(float(v) for v in std)


def fashion_mnist_dir() -> Path:
    """Where Debian's `dataset-fashion-mnist` put the files (or $SDR_FASHION_MNIST_DIR)."""
    return Path(os.environ.get("SDR_FASHION_MNIST_DIR", str(FASHION_MNIST_DIR)))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SourceError(f"not an IDX file: {path}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"truncated IDX file: {path}")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for suffix in (".gz", ""):
        candidate = root / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install Debian's package "
        "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or set "
        "SDR_FASHION_MNIST_DIR to a folder holding the IDX files."
    )


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw 28 x 28 uint8 images and labels for split 'train', 'test' or 'all'."""
    root = fashion_mnist_dir()
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    images, labels = [], []
    for prefix in prefixes:
        images.append(_read_idx(_find(root, f"{prefix}-images-idx3-ubyte")))
        labels.append(_read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8 x 8 digits (values 0..16) as uint8 0..255 images."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def _resize_all(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    if images.shape[1:3] == (size, size) and channels == 1:
        return images[:, :, :, None]
    return np.stack([prepare_uint8(im, size, channels) for im in images])


def split_class_filter(spec: str) -> tuple[str, tuple[int, ...] | None]:
    """'fashion-mnist:test@5,7,9' -> ('fashion-mnist:test', (5, 7, 9)); no '@' -> (spec, None)."""
    if "@" not in spec or Path(spec).exists():  # a folder may have '@' in its name
        return spec, None
    base, _, classes = spec.rpartition("@")
    try:
        keep = tuple(int(c) for c in classes.split(","))
    except ValueError:
        raise SourceError(f"class filter in {spec!r} must be comma-separated class indices, "
                          "e.g. fashion-mnist:test@5,7,9") from None
    if not keep or len(set(keep)) != len(keep):
        raise SourceError(f"class filter in {spec!r} must list distinct class indices")
    return base, keep


def keep_classes(source: ImageSource, keep: tuple[int, ...]) -> ImageSource:
    """Only the images of classes `keep`, relabelled 0..len(keep)-1 in that order."""
    if source.labels is None:
        raise SourceError(f"{source.name}: a class filter needs a labelled source")
    known = len(source.label_names) or int(source.labels.max()) + 1
    bad = [c for c in keep if not 0 <= c < known]
    if bad:
        raise SourceError(f"{source.name}: unknown class index(es) {bad} (source has {known})")
    index = np.flatnonzero(np.isin(source.labels, keep))
    remap = np.full(known, -1, dtype=np.int64)
    remap[list(keep)] = np.arange(len(keep))
    names = tuple(source.label_names[c] if source.label_names else str(c) for c in keep)
    return ImageSource(source.name, source.images[index], remap[source.labels[index]], names,
                       source.skipped)


MIX_PREFIX = "mix:"


def parse_mix(spec: str) -> list[tuple[str, int | None]]:
    """'mix:fashion-mnist:train#12000+glyphs:latin' -> [(part, 12000), (part, None)]."""
    body = spec[len(MIX_PREFIX):]
    parts: list[tuple[str, int | None]] = []
    for raw in body.split("+"):
        part, sep, cap = raw.strip().rpartition("#")
        if not sep:
            part, cap_value = raw.strip(), None
        else:
            try:
                cap_value = int(cap)
            except ValueError:
                cap_value = 0
            if cap_value < 1:
                raise SourceError(f"{spec!r}: part limit after '#' must be a positive integer, "
                                  f"got {raw!r}")
        if not part:
            raise SourceError(f"mixed source {spec!r} has an empty part (use "
                              "mix:fashion-mnist:train+glyphs:latin,cyrillic, optionally PART#N)")
        if part.startswith(MIX_PREFIX):
            raise SourceError(f"{spec!r}: a mixed source cannot contain another mix")
        parts.append((part, cap_value))
    if len(parts) < 2:
        raise SourceError(f"mixed source {spec!r} needs at least two '+'-joined parts")
    return parts


def load_mix(spec: str, image_size: int, channels: int, limit: int | None,
             seed: int) -> ImageSource:
    """A pool of several sources; label = which part (domain) an image came from.

    A part's `#N` caps it; parts without one share `limit` evenly (balanced domains). Every part
    is loaded with the same seed, so a mix holds exactly the images its parts would alone.
    """
    parts = parse_mix(spec)
    free = [i for i, (_, cap) in enumerate(parts) if cap is None]
    caps = [cap for _, cap in parts]
    if limit is not None and free:
        rest = max(limit - sum(c for c in caps if c is not None), 0)
        for j, i in enumerate(free):
            caps[i] = rest // len(free) + (1 if j < rest % len(free) else 0)
    loaded = [load_source(part, image_size, channels, cap, seed) if cap != 0
              else ImageSource(part, np.zeros((0, image_size, image_size, channels), np.uint8))
              for (part, _), cap in zip(parts, caps, strict=True)]
    images = np.concatenate([p.images for p in loaded])
    domains = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(loaded)])
    skipped = [s for p in loaded for s in p.skipped]
    source = ImageSource(spec, images, domains, tuple(part for part, _ in parts), skipped)
    if limit is not None and limit < len(source):  # explicit part caps add up past `limit`
        index = np.sort(np.random.default_rng(seed).choice(len(source), limit, replace=False))
        source = source.subset(index)
        source.skipped = skipped
    return source


def load_glyph_source(spec: str, image_size: int, channels: int, limit: int | None, seed: int,
                      keep: tuple[int, ...] | None) -> ImageSource:
    """Rendered glyphs: exactly `limit` images (balanced over the kept classes) when given."""
    gspec = glyphs.parse_glyph_spec(spec)
    count = None
    if limit is not None:
        count = limit
    elif keep is not None:
        count = gspec.per_class * len(keep)
    images, labels, names = glyphs.render_glyphs(gspec, image_size, channels, count, seed, keep)
    return ImageSource(spec, images, labels, names)


def load_source(spec: str, image_size: int, channels: int = 1, limit: int | None = None,
                seed: int = 0) -> ImageSource:
    """Load a source by name at image_size x image_size x channels.

    `NAME@i,j,k` keeps only classes i, j, k (relabelled 0..2), e.g. fashion-mnist:test@5,7,9.
    `limit` keeps a seeded random subset (labels follow), for small configs and tests.
    `glyphs:SCRIPTS[:pool|heldout|all][:n=PER_CLASS]` renders printed characters (see
    sdr_edge.data.glyphs); with `limit` exactly that many, balanced over the classes.
    `mix:PART+PART[#N]...` concatenates sources (labels = part index; see load_mix); a class
    filter belongs to a part (`mix:fashion-mnist:train@5,7+glyphs:latin`).
    """
    if spec.startswith(MIX_PREFIX):
        return load_mix(spec, image_size, channels, limit, seed)
    full_spec = spec
    spec, keep = split_class_filter(spec)
    if spec == "glyphs" or spec.startswith("glyphs:"):
        source = load_glyph_source(spec, image_size, channels, limit, seed, keep)
        if keep is not None:
            source = keep_classes(source, keep)
        source.name = full_spec
        return source
    if spec == "builtin:digits":
        raw, labels = load_digits_raw()
        source = ImageSource(spec, _resize_all(raw, image_size, channels), labels,
                             tuple(str(i) for i in range(10)))
    elif spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        split = spec.split(":", 1)[1] if ":" in spec else "all"
        if split not in ("train", "test", "all"):
            raise SourceError(f"unknown Fashion-MNIST split {split!r} (use train, test or all)")
        raw, labels = load_fashion_mnist(split)
        source = ImageSource(spec, _resize_all(raw, image_size, channels), labels,
                             FASHION_MNIST_LABELS)
    elif spec.startswith("builtin:"):
        raise SourceError(f"unknown built-in source {spec!r} (known: builtin:digits)")
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"data source {spec!r} is neither a known name (builtin:digits, fashion-mnist, "
                "fashion-mnist:train, fashion-mnist:test, glyphs:SCRIPTS, mix:A+B) nor an "
                "existing folder"
            )
        scan = scan_folder(path, image_size, channels)
        source = ImageSource(str(path), scan.images, scan.labels, scan.label_names,
                             [str(p) for p in scan.skipped])
    if keep is not None:
        source = keep_classes(source, keep)
    source.name = full_spec
    if limit is not None and limit < len(source):
        index = np.sort(np.random.default_rng(seed).choice(len(source), limit, replace=False))
        skipped = source.skipped
        source = source.subset(index)
        source.skipped = skipped
    return source
