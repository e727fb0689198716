"""`sdr-server report RUN`: rebuilds report/ of a finished run (monitor figures included, other
stages' sections kept) and of a run killed mid-phase (a torn last metrics line, no codes yet),
writing nothing else into the run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers_rundir import tiny_train_config

from sdr_edge.artifacts.run_dir import METRICS, REPORT_DIR, verify_run_manifest
from sdr_edge.report.html import Section, read_sections, update_index
from sdr_edge.training.config import config_from_dict
from sdr_edge.training.pipeline import train
from sdr_edge_server.cli import main

TINY = tiny_train_config()


def _tree(run: Path, skip: str = REPORT_DIR) -> dict[str, str]:
    """sha256 of every file of the run outside `skip` (what the command must not touch)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()
            and p.relative_to(run).parts[0] != skip}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    train(config_from_dict(TINY), out)
    return out


def _table(run: Path) -> list[list[str]]:
    return next(s for s in read_sections(run / REPORT_DIR) if s.key == "Training").table


def test_report_of_a_finished_run_redraws_training_and_keeps_other_sections(finished_run,
                                                                            capsys):
    run = finished_run
    update_index(run / REPORT_DIR, [Section("Federated rounds", text="added by a later stage")])
    (run / REPORT_DIR / "index.html").unlink()
    (run / REPORT_DIR / "collapse.png").unlink()
    before = _tree(run)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / REPORT_DIR / "index.html")
    report = run / REPORT_DIR
    for png in ("loss.png", "knn.png", "collapse.png", "throughput.png", "data_wait.png",
                "codes_level_1.png", "clusters_level1.png"):
        assert (report / png).stat().st_size > 1000, png
    page = (report / "index.html").read_text()
    assert "collapse.png" in page and "Federated rounds" in page and "Level-1 clusters" in page
    header, *rows = _table(run)
    assert header[-3:] == ["last collapse std", "last images/s", "last data wait"]
    assert [r[0] for r in rows] == ["phase0", "level_1", "level_2"]
    assert _tree(run) == before  # nothing outside report/ was written
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging left
    verify_run_manifest(run)  # a redrawn report is a view: the finished run still verifies


def test_report_of_a_run_killed_mid_phase(finished_run, tmp_path, capsys):
    run = tmp_path / "killed"
    run.mkdir()
    (run / "config.toml").write_bytes((finished_run / "config.toml").read_bytes())
    lines = (finished_run / METRICS).read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if json.loads(line).get("phase") == "phase0")
    kept = lines[:first + 1]  # phase 0's first epoch of two, then a torn line
    (run / METRICS).write_text("\n".join(kept) + "\n" + lines[first + 1][:25])
    before = _tree(run)
    assert main(["report", str(run)]) == 0
    header, *rows = _table(run)
    assert rows == [[*rows[0][:1], "1", *rows[0][2:]]] and rows[0][0] == "phase0"
    assert {p.name for p in (run / REPORT_DIR).iterdir()} >= {"loss.png", "collapse.png",
                                                              "index.html"}
    assert not (run / REPORT_DIR / "codes_level_1.png").exists()  # no codes yet
    assert _tree(run) == before
    capsys.readouterr()


def test_report_of_a_folder_without_metrics_or_codes_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to report" in err
    assert list(tmp_path.iterdir()) == []  # its staging folder is gone
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
