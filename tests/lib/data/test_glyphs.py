"""Glyph source (rendered printed characters), mixed pools, and the negative-transfer bench."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdr_edge.data import glyphs, load_source
from sdr_edge.data.sources import parse_mix

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
needs_fonts = pytest.mark.skipif(
    not glyphs.scan_fonts(glyphs.DEFAULT_FONT_DIRS) or not DEJAVU.exists(),
    reason="needs Debian's fonts-dejavu-core / fonts-noto-core (see .ci/run)")


@pytest.fixture(autouse=True)
def _system_fonts(monkeypatch):
    monkeypatch.delenv("SDR_FONT_DIRS", raising=False)


@needs_fonts
def test_glyphs_deterministic_for_a_seed():
    a = load_source("glyphs:latin,cyrillic", 20, limit=120, seed=4)
    b = load_source("glyphs:latin,cyrillic", 20, limit=120, seed=4)
    c = load_source("glyphs:latin,cyrillic", 20, limit=120, seed=5)
    assert a.images.shape == (120, 20, 20, 1) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.max() > 150 and a.images[:, 0, 0, 0].mean() < 20  # white ink on black
    assert a.label_names[0] == "A" and a.label_names[26] == "А" and len(a.label_names) == 58


@needs_fonts
def test_glyph_classes_balanced_and_limit_respected():
    src = load_source("glyphs:greek", 16, channels=3, limit=100)
    counts = np.bincount(src.labels, minlength=24)
    assert len(src) == 100 and src.images.shape[3] == 3
    assert counts.max() - counts.min() <= 1 and counts.min() == 4
    full = load_source("glyphs:greek:n=5", 16)
    assert len(full) == 24 * 5 and set(np.bincount(full.labels)) == {5}
    # The class filter renders only the kept classes, relabelled 0..k-1, still balanced.
    sub = load_source("glyphs:greek:heldout@3,0", 16, limit=40)
    assert sub.label_names == ("Δ", "Α") and np.array_equal(np.bincount(sub.labels), [20, 20])


@needs_fonts
def test_heldout_fonts_disjoint_from_pool_fonts():
    for script in ("latin", "greek", "cyrillic"):
        pool = glyphs.fonts_for(script, "pool")
        held = glyphs.fonts_for(script, "heldout")
        assert pool and held
        assert not {glyphs.split_key(f) for f in pool} & {glyphs.split_key(f) for f in held}
        files = {p for fs in pool.values() for p in fs} | {p for fs in held.values() for p in fs}
        assert files == {p for fs in glyphs.fonts_for(script, "all").values() for p in fs}
    # The rule reads the family name only: a condensed cut goes with its regular family.
    assert glyphs.split_key("DejaVuSansCondensed") == glyphs.split_key("DejaVuSans")
    assert glyphs.is_heldout("DejaVuSerif") and not glyphs.is_heldout("DejaVuSans")
    # Fonts that carry Latin but are not text fonts for it never serve it.
    latin = glyphs.fonts_for("latin", "all")
    assert not any("Math" in f or "Symbols" in f or "Elbasan" in f for f in latin)


def test_no_font_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SDR_FONT_DIRS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no font covering greek found in .*"
                                                r"fonts-dejavu-core.*SDR_FONT_DIRS"):
        load_source("glyphs:greek", 16, limit=10)
    with pytest.raises(FileNotFoundError, match="fonts-noto-cjk"):
        load_source("glyphs:cjk", 16, limit=10)


@needs_fonts
def test_font_dir_with_only_pool_fonts_refuses_heldout(tmp_path, monkeypatch):
    shutil.copy(DEJAVU, tmp_path / DEJAVU.name)
    monkeypatch.setenv("SDR_FONT_DIRS", str(tmp_path))
    assert len(load_source("glyphs:latin", 16, limit=26)) == 26
    with pytest.raises(FileNotFoundError, match="no heldout font family covers latin.*DejaVuSans"):
        load_source("glyphs:latin:heldout", 16, limit=26)


@pytest.mark.parametrize("spec, message", [
    ("glyphs:klingon", "unknown script"),
    ("glyphs:latin:italic", "unknown option 'italic'"),
    ("glyphs:latin:n=0", "n= must be a positive"),
    ("glyphs:latin,latin", "listed twice"),
    ("glyphs:", "must look like glyphs:latin"),
])
def test_bad_glyph_spec_is_one_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        load_source(spec, 16, limit=4)


@needs_fonts
def test_mixed_source_length_labels_and_parts():
    mix = load_source("mix:builtin:digits+glyphs:latin", 16, limit=101, seed=2)
    assert len(mix) == 101 and mix.label_names == ("builtin:digits", "glyphs:latin")
    assert np.array_equal(np.bincount(mix.labels), [51, 50])  # domain ids, split evenly
    # Same seed: the mix holds exactly the images its parts would alone.
    digits = load_source("builtin:digits", 16, limit=51, seed=2)
    latin = load_source("glyphs:latin", 16, limit=50, seed=2)
    assert np.array_equal(mix.images, np.concatenate([digits.images, latin.images]))
    capped = load_source("mix:builtin:digits@0,1#30+glyphs:greek:heldout#12", 16)
    assert np.array_equal(np.bincount(capped.labels), [30, 12])
    first = load_source("builtin:digits@0,1", 16, limit=30, seed=0)
    assert np.array_equal(capped.images[:30], first.images)


@pytest.mark.parametrize("spec, message", [
    ("mix:builtin:digits", "at least two"),
    ("mix:builtin:digits++builtin:digits", "empty part"),
    ("mix:builtin:digits#x+builtin:digits", "positive integer"),
])
def test_bad_mix_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mix(spec)


@needs_fonts
def test_negative_transfer_smoke(tmp_path):
    from sdr_edge.bench.budgets import TaskSpec
    from sdr_edge.bench.domains import NegativeTransferConfig, run_negative_transfer

    cfg = NegativeTransferConfig(epochs=1, pool_limit=160, seeds=2, task_limit=90,
                                 budget="minute")
    tasks = [TaskSpec("footwear-3", "fashion-mnist:test@5,7,9", 90),
             TaskSpec("greek-heldout", "glyphs:greek:heldout", 96)]
    try:
        result = run_negative_transfer(cfg, tmp_path / "nt", tasks)
    except FileNotFoundError as exc:  # Fashion-MNIST is a Debian package too
        pytest.skip(str(exc))
    assert {n: r["images"] for n, r in result["pools"].items()} == {
        "fashion": 160, "glyphs": 160, "mixed": 320}
    for row in result["tasks"]:
        for pool in ("fashion", "glyphs", "mixed"):
            assert len(row[pool]["runs"]) == 2 and 0.0 <= row[pool]["mean"] <= 1.0
    assert [r["matching_pool"] for r in result["tasks"]] == ["fashion", "glyphs"]
    saved = json.loads((tmp_path / "nt" / "results.json").read_text())
    assert saved["pool_is_good"] == bool(saved["negative_transfer_tasks"])
    table = (tmp_path / "nt" / "results.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| footwear-3 | fashion |")
    again = run_negative_transfer(cfg, tmp_path / "nt", tasks)
    assert all(r["reused"] for r in again["pools"].values())


def test_negative_transfer_cli_fails_fast_without_fonts(tmp_path, monkeypatch, capsys):
    from helpers_benchmarks import load_benchmark

    monkeypatch.setenv("SDR_FONT_DIRS", str(tmp_path / "no-fonts"))
    bench = load_benchmark("negative_transfer")
    out = tmp_path / "out"
    assert bench.main(["--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fonts-dejavu-core" in err[0] and "Traceback" not in err[0]
    assert not out.exists()  # failed before any training
