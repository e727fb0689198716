"""Printed characters rendered from installed fonts: real glyph data in many scripts, no download.

A source spec is ``glyphs:SCRIPTS[:FONTSET][:n=PER_CLASS]``, e.g. ``glyphs:latin``,
``glyphs:greek,cyrillic``, ``glyphs:greek:heldout``. The label is the character's index within
the chosen scripts, in the order given (``glyphs:latin,cyrillic``: 0-25 are A-Z, 26-57 are А-Я).

Fonts come from ``/usr/share/fonts`` and ``/usr/local/share/fonts`` (Debian's
``fonts-noto-core``, ``fonts-dejavu-core``, ``fonts-liberation``, ``fonts-noto-cjk``), or from
the folders in ``$SDR_FONT_DIRS`` (``os.pathsep``-separated). A font serves a script when its
cmap holds every character of the script; symbol/math/music fonts never do, and a Noto font named
for another script (``NotoSansElbasan`` carries Latin too) serves only its own script.

Pool and held-out fonts: every font family gets a *split key* (its file-name family with width
and optical-size words such as Condensed, Narrow, Display dropped, so ``DejaVuSansCondensed``
goes with ``DejaVuSans``). A family is held out when the first 8 bytes of
``sha256(split key, lower-cased)`` read as a fraction are below ``HELDOUT_FRACTION`` (0.4). The
rule depends on the family name only, so ``glyphs:greek:heldout`` never shares a family with
``glyphs:latin,greek`` (or any other pool spec) on any machine. FONTSET is ``pool`` (default),
``heldout`` or ``all``. With today's Debian fonts the held-out families are DejaVu Serif and
Noto Serif (Latin, Greek, Cyrillic, Armenian), plus Noto Serif Devanagari, Noto Sans/Serif
Hebrew, Noto Serif Georgian and Noto Sans Arabic.

Each image: a balanced class, a font family drawn uniformly among those serving the script, a
file (weight/style) drawn within the family, a raster size, then the ink is cropped and placed
with small affine jitter (scale, aspect, rotation, shear, shift) as white ink on black, at the
requested size. Everything is drawn from one ``numpy`` generator seeded by ``seed``, so a seed
and the same installed fonts give the same images.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from sdr_edge.data.folder import SourceError

log = logging.getLogger(__name__)

DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
FONT_SETS = ("pool", "heldout", "all")
HELDOUT_FRACTION = 0.4
DEFAULT_PER_CLASS = 250
RASTER_SIZES = (32, 40, 48)  # font pixel sizes drawn per image (hinting differs a little)


@dataclass(frozen=True)
class Script:
    """The characters (classes) of one script and the Debian packages whose fonts cover it."""

    name: str
    chars: str
    packages: tuple[str, ...]


def _span(first: int, last: int, skip: tuple[int, ...] = ()) -> str:
    return "".join(chr(c) for c in range(first, last + 1) if c not in skip)


_LGC = ("fonts-dejavu-core", "fonts-noto-core", "fonts-liberation")
SCRIPTS: dict[str, Script] = {s.name: s for s in (
    Script("latin", _span(0x41, 0x5A), _LGC),                                # A-Z
    Script("greek", _span(0x391, 0x3A9, (0x3A2,)), _LGC),                    # Α-Ω
    Script("cyrillic", _span(0x410, 0x42F), _LGC),                           # А-Я
    Script("armenian", _span(0x531, 0x556), ("fonts-noto-core", "fonts-dejavu-core")),
    Script("georgian", _span(0x10D0, 0x10F0), ("fonts-noto-core", "fonts-dejavu-core")),
    Script("hebrew", _span(0x5D0, 0x5EA, (0x5DA, 0x5DD, 0x5DF, 0x5E3, 0x5E5)),
           ("fonts-noto-core",)),                                            # no final forms
    Script("arabic", "ابتثجحخدذرزسشصضطظعغفقكلمنهوي", ("fonts-noto-core",)),  # isolated forms
    Script("devanagari", _span(0x915, 0x939), ("fonts-noto-core",)),         # consonants
    Script("cjk", "一二三四五六七八九十人大小中日月山川水火木金土天上下口手目田心", ("fonts-noto-cjk",)),
)}

_NOT_TEXT = re.compile(r"math|symbol|emoji|music|icon", re.IGNORECASE)
_SPLIT_WORDS = re.compile(r"(Semi|Extra|Ultra)?(Condensed|Expanded|Narrow|Display|Light|"
                          r"Black|Thin|Medium|UI)", re.IGNORECASE)
_NOTO_GENERIC = re.compile(r"^(Sans|Serif)?(Mono)?$", re.IGNORECASE)


@dataclass(frozen=True)
class FontFile:
    """One installed font file: its family (from the file name) and the scripts it serves."""

    path: str
    family: str
    split_key: str
    scripts: frozenset[str]

    @property
    def heldout(self) -> bool:
        return is_heldout(self.split_key)


@dataclass(frozen=True)
class GlyphSpec:
    scripts: tuple[str, ...]
    font_set: str = "pool"
    per_class: int = DEFAULT_PER_CLASS

    @property
    def classes(self) -> tuple[tuple[str, str], ...]:
        """(script, character) of every class, in label order."""
        return tuple((s, ch) for s in self.scripts for ch in SCRIPTS[s].chars)


def font_dirs() -> tuple[str, ...]:
    """Folders scanned for fonts: $SDR_FONT_DIRS (os.pathsep-separated) or the system ones."""
    env = os.environ.get("SDR_FONT_DIRS")
    if env is not None:
        return tuple(d for d in env.split(os.pathsep) if d)
    return DEFAULT_FONT_DIRS


def family_of(path: str | Path) -> str:
    """'DejaVuSansCondensed-Bold.ttf' -> 'DejaVuSansCondensed'; 'NotoSans[wght].ttf' -> 'NotoSans'."""
    return re.split(r"[-\[_]", Path(path).stem, maxsplit=1)[0] or Path(path).stem


def split_key(family: str) -> str:
    """The family with width/optical-size words dropped: near-identical designs split together."""
    return _SPLIT_WORDS.sub("", family) or family


def is_heldout(key: str) -> bool:
    """Held out iff sha256(key.lower()) read as a fraction in [0, 1) is below HELDOUT_FRACTION."""
    digest = hashlib.sha256(key.lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < HELDOUT_FRACTION


def _serves(family: str, script: str) -> bool:
    """Whether a family that covers `script` should be used for it (text font, right script)."""
    if _NOT_TEXT.search(family):
        return False
    if family.startswith("Noto"):
        rest = _SPLIT_WORDS.sub("", family[len("Noto"):])
        if not _NOTO_GENERIC.match(rest):  # a Noto font named for a script serves only that one
            return script in rest.lower()
    return True


@lru_cache(maxsize=8)
def scan_fonts(dirs: tuple[str, ...]) -> tuple[FontFile, ...]:
    """Every readable font under `dirs` with the scripts it serves (cached per process)."""
    from fontTools.ttLib import TTFont

    paths = sorted({str(p) for d in dirs if Path(d).is_dir() for p in Path(d).rglob("*")
                    if p.suffix.lower() in FONT_SUFFIXES and p.is_file()})
    out = []
    for path in paths:
        try:
            with TTFont(path, lazy=True, fontNumber=0) as tt:
                cmap = set(tt.getBestCmap() or {})
        except Exception as exc:  # noqa: BLE001 - a broken font file is skipped, not fatal
            log.debug("skipping unreadable font %s: %s", path, exc)
            continue
        family = family_of(path)
        scripts = frozenset(name for name, s in SCRIPTS.items()
                            if all(ord(ch) in cmap for ch in s.chars) and _serves(family, name))
        if scripts:
            out.append(FontFile(path, family, split_key(family), scripts))
    return tuple(out)


def fonts_for(script: str, font_set: str = "pool",
              dirs: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Family -> font files serving `script` in `font_set`; a clear error naming the package."""
    if script not in SCRIPTS:
        raise SourceError(f"unknown glyph script {script!r} (known: {', '.join(SCRIPTS)})")
    if font_set not in FONT_SETS:
        raise SourceError(f"unknown glyph font set {font_set!r} (use {', '.join(FONT_SETS)})")
    dirs = font_dirs() if dirs is None else dirs
    covering = [f for f in scan_fonts(dirs) if script in f.scripts]
    chosen = [f for f in covering
              if font_set == "all" or f.heldout == (font_set == "heldout")]
    if not chosen:
        packages = " or ".join(f"`{p}`" for p in SCRIPTS[script].packages)
        where = ", ".join(dirs) or "(no folder)"
        if covering:
            others = sorted({f.family for f in covering})
            raise FileNotFoundError(
                f"no {font_set} font family covers {script} in {where} (the split is by family "
                f"name; covering: {', '.join(others)}); install more fonts, e.g. Debian's "
                f"{packages}, or use another font set")
        raise FileNotFoundError(
            f"no font covering {script} found in {where}; install Debian's {packages} "
            f"(apt-get install {SCRIPTS[script].packages[0]}) or set SDR_FONT_DIRS to a folder "
            "of .ttf/.otf fonts")
    families: dict[str, list[str]] = {}
    for f in chosen:
        families.setdefault(f.family, []).append(f.path)
    return families


def parse_glyph_spec(spec: str) -> GlyphSpec:
    """'glyphs:greek,cyrillic:heldout:n=100' -> GlyphSpec; a clear error for a bad spec."""
    parts = spec.split(":")
    if parts[0] != "glyphs" or len(parts) < 2 or not parts[1]:
        raise SourceError(f"glyph source {spec!r} must look like glyphs:latin or "
                          "glyphs:greek,cyrillic[:pool|heldout|all][:n=PER_CLASS]")
    scripts = tuple(s.strip().lower() for s in parts[1].split(","))
    unknown = [s for s in scripts if s not in SCRIPTS]
    if unknown:
        raise SourceError(f"{spec!r}: unknown script(s) {', '.join(unknown)} "
                          f"(known: {', '.join(SCRIPTS)})")
    if len(set(scripts)) != len(scripts):
        raise SourceError(f"{spec!r}: a script is listed twice")
    font_set, per_class = "pool", DEFAULT_PER_CLASS
    for opt in parts[2:]:
        if opt in FONT_SETS:
            font_set = opt
        elif opt.startswith("n="):
            try:
                per_class = int(opt[2:])
            except ValueError:
                per_class = 0
            if per_class < 1:
                raise SourceError(f"{spec!r}: n= must be a positive number of images per class")
        else:
            raise SourceError(f"{spec!r}: unknown option {opt!r} (use pool, heldout, all or "
                              "n=PER_CLASS)")
    return GlyphSpec(scripts, font_set, per_class)


@lru_cache(maxsize=512)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size, index=0)


@lru_cache(maxsize=50_000)
def _ink(path: str, size: int, ch: str) -> np.ndarray:
    """The character's ink, white on black, cropped to its bounding box (read-only)."""
    from PIL import Image, ImageDraw

    side = 3 * size
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).text((side / 2, side / 2), ch, fill=255, font=_font(path, size),
                                anchor="mm")
    a = np.asarray(canvas)
    ys, xs = np.nonzero(a)
    if ys.size == 0:
        crop = np.zeros((0, 0), dtype=np.uint8)
    else:
        crop = np.ascontiguousarray(a[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    crop.setflags(write=False)
    return crop


def _place(ink: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Scale the ink to a random box, then rotate/shear/shift it slightly onto a size x size image."""
    h, w = ink.shape
    target = rng.uniform(0.6, 0.9) * size
    aspect = rng.uniform(0.85, 1.15)
    theta = math.radians(rng.uniform(-12.0, 12.0))
    shear = rng.uniform(-0.15, 0.15)
    shift = rng.uniform(-0.08, 0.08, size=2) * size
    gain = rng.uniform(0.8, 1.0)
    s = target / max(h, w)
    sw, sh = max(1, round(w * s * math.sqrt(aspect))), max(1, round(h * s / math.sqrt(aspect)))
    small = cv2.resize(ink, (sw, sh), interpolation=cv2.INTER_AREA)
    c, si = math.cos(theta), math.sin(theta)
    lin = np.array([[c, -si], [si, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    centre_in = np.array([(sw - 1) / 2, (sh - 1) / 2])
    centre_out = np.array([(size - 1) / 2, (size - 1) / 2]) + shift
    m = np.hstack([lin, (centre_out - lin @ centre_in)[:, None]])
    out = cv2.warpAffine(small, m, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.clip(out.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels, each class n // C or n // C + 1 times, in a seeded random order."""
    labels = np.arange(n, dtype=np.int64) % num_classes
    rng.shuffle(labels)
    return labels


def render_glyphs(spec: GlyphSpec, image_size: int, channels: int = 1, n: int | None = None,
                  seed: int = 0, classes: tuple[int, ...] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(N x H x W x C uint8 images, labels, label names) for a glyph spec.

    `n` images in all (default: per_class for every class), balanced over `classes` (indices
    into the spec's classes; default all). Labels keep the spec's class indices.
    """
    all_classes = spec.classes
    keep = tuple(range(len(all_classes))) if classes is None else tuple(classes)
    bad = [c for c in keep if not 0 <= c < len(all_classes)]
    if bad:
        raise SourceError(f"unknown class index(es) {bad} for glyphs of "
                          f"{','.join(spec.scripts)} ({len(all_classes)} classes)")
    fonts = {s: fonts_for(s, spec.font_set) for s in {all_classes[c][0] for c in keep}}
    families = {s: sorted(f) for s, f in fonts.items()}
    n = spec.per_class * len(keep) if n is None else n
    rng = np.random.default_rng(seed)
    labels = np.asarray(keep, dtype=np.int64)[balanced_labels(n, len(keep), rng)]
    images = np.zeros((n, image_size, image_size, channels), dtype=np.uint8)
    for i, label in enumerate(labels):
        script, ch = all_classes[label]
        for _attempt in range(8):  # a font whose glyph draws no ink: draw another font
            family = families[script][rng.integers(len(families[script]))]
            files = fonts[script][family]
            ink = _ink(files[rng.integers(len(files))], int(rng.choice(RASTER_SIZES)), ch)
            if ink.size:
                break
        else:
            raise SourceError(f"fonts for {script} draw no ink for {ch!r} (U+{ord(ch):04X})")
        images[i] = _place(ink, image_size, rng)[:, :, None]
    names = tuple(ch for _, ch in all_classes)
    return images, labels, names
