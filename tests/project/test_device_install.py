"""A device install has no torch: `pip install sdr-edge` alone runs signature, fetch and infer.

The project is copied, installed with its core dependencies only (`.[device]`, from whatever
index pip is configured with) into a fresh venv without system site packages, and the three
device commands then run there against a real registry process, on a kit the registry serves
and an ONNX model exported by the training side. Each command runs under an import guard that
refuses (and records) every server-side package, so an import that is caught and silently
worked around is a failure too. The same guarded commands also run from the development venv,
where torch *is* installed: the guard, not the missing package, is what stops it there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_export import trained_digits, write_digit_pngs
from helpers_registry import serve_registry
from helpers_rundir import TINY_BRANCHING, shared_tiny_run

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.routing.signature import run_id_of, validate_signature

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Top-level packages that only the server, federated and export extras bring: a device
# command must not import (or even try to import) any of them.
SERVER_SIDE = ("torch", "torchvision", "torch_pruning", "safetensors", "sklearn", "scipy",
               "threadpoolctl", "faiss", "flwr", "fastapi", "starlette", "pydantic", "uvicorn",
               "matplotlib", "onnx", "onnxscript", "onnxconverter_common", "PIL", "fontTools",
               "tomli_w")
INSTALL_TIMEOUT = 300

# Runs `sdr-client ARGS` with a meta-path finder that refuses every SERVER_SIDE import and
# prints what was refused (also probes such as importlib.util.find_spec) on the last line.
GUARD = """
import json, sys
BLOCKED = set(json.loads(sys.argv[1]))
refused = []
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            refused.append(name)
            raise ModuleNotFoundError(f"{name} is not part of a device install", name=name)
        return None
sys.meta_path.insert(0, Refuse())
from sdr_edge_client.cli import main
try:
    rc = main(sys.argv[2:])
finally:
    print("REFUSED " + json.dumps(sorted(set(refused))), file=sys.stderr)
sys.exit(rc)
"""


def _copy_project(dest: Path) -> Path:
    """What `pip install .` sees: the project files and every top-level package."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in sorted(REPO.iterdir()):
        if pkg.is_dir() and pkg.name != "tests" and (pkg / "__init__.py").is_file():
            shutil.copytree(pkg, dest / pkg.name, ignore=ignore)
    return dest


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """A venv holding `sdr-edge[device]` and its dependencies only; returns its python."""
    base = tmp_path_factory.mktemp("device-install")
    src = _copy_project(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    t0 = time.perf_counter()
    # The development venv's pip installs into the new one (--python): no ensurepip step.
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "--quiet", "--disable-pip-version-check", f"{src}[device]"],
                          capture_output=True, text=True, env=_clean_env(), cwd=base,
                          timeout=INSTALL_TIMEOUT)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"pip install '.[device]' failed:\n{proc.stderr[-4000:]}"
    print(f"device install: {seconds:.1f} s")
    return python


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry process serving the shared tiny run (its kit included)."""
    run_dir = shared_tiny_run(tmp_path_factory.getbasetemp())
    with serve_registry(run_dir, tmp_path_factory.mktemp("device-registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def device_files(tmp_path_factory):
    """An ONNX digits classifier exported on the training side, and held-out digit images."""
    from sdr_edge.export.pipeline import ExportOptions, export_model

    base = tmp_path_factory.mktemp("device-files")
    model, spec, _ = trained_digits()
    onnx_path = base / "digits.onnx"
    export_model(model, spec, (0, 1), onnx_path,
                 ExportOptions(eval_source="builtin:digits", eval_limit=200, progress=False))
    images = write_digit_pngs(base / "images", 24, start=1500)  # never trained on
    return onnx_path, base / "images", images


def _device_python(request) -> tuple[str, dict[str, str]]:
    if request.param == "fresh-venv":
        return str(request.getfixturevalue("device_venv")), _clean_env()
    return sys.executable, {**_clean_env(), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module", params=["fresh-venv", "dev-venv"])
def client(request, tmp_path_factory):
    """Run one guarded `sdr-client` command; returns (rc, stdout, stderr, refused imports)."""
    python, env = _device_python(request)
    cwd = tmp_path_factory.mktemp("device-cwd")  # not the repo: the installed code runs

    def run(*args: str) -> tuple[int, str, str, list[str]]:
        proc = subprocess.run([python, "-c", GUARD, json.dumps(SERVER_SIDE), *args],
                              capture_output=True, text=True, env=env, cwd=cwd, timeout=180)
        head, _, last = proc.stderr.rstrip().rpartition("\n")
        assert last.startswith("REFUSED "), proc.stderr[-3000:]
        return proc.returncode, proc.stdout, head, json.loads(last.removeprefix("REFUSED "))

    return run


def test_fresh_venv_holds_the_device_install_only(device_venv):
    outside = device_venv.parents[2]  # `python -c` puts the cwd first on sys.path: not the repo
    code = ("import importlib.util, json, sys, sdr_edge_client, sdr_edge\n"
            "print(json.dumps({'found': [m for m in json.loads(sys.argv[1]) "
            "if importlib.util.find_spec(m)], 'client': sdr_edge_client.__file__, "
            "'generic': [m for m in ('server', 'client', 'export') if importlib.util.find_spec(m)], "
            "'prefix': sys.prefix}))\n")
    proc = subprocess.run([str(device_venv), "-c", code, json.dumps(SERVER_SIDE)],
                          capture_output=True, text=True, env=_clean_env(), cwd=outside,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["found"] == []  # no torch, no server-side package at all
    assert info["client"].startswith(info["prefix"])  # the installed copy, not the repo
    assert info["generic"] == []  # the apps are installed under the project's names only
    torch = subprocess.run([str(device_venv), "-c", "import torch"], capture_output=True,
                           text=True, env=_clean_env(), cwd=outside, timeout=60)
    assert torch.returncode == 1 and "No module named 'torch'" in torch.stderr
    script = device_venv.parent / "sdr-client"  # the console script works too
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            env=_clean_env(), cwd=outside, timeout=60)
    assert helped.returncode == 0 and "signature" in helped.stdout and "infer" in helped.stdout


def test_kit_signature_fetch_and_infer_without_torch(client, served, device_files, tmp_path):
    onnx_path, image_dir, images = device_files
    pub, token_file = str(served.pubkey), tmp_path / "token"
    token_file.write_text(served.token + "\n")
    registry = ["--server", served.url, "--token-file", str(token_file), "--pubkey", pub]

    rc, out, err, refused = client("fetch", *registry, "--kit", "--out", str(tmp_path / "kit"))
    assert (rc, refused) == (0, []), err
    assert json.loads(out) == {"kit": str(tmp_path / "kit"), "verified": True}

    sig_path = tmp_path / "signature.json"
    rc, out, err, refused = client("signature", "--kit", str(tmp_path / "kit"), "--pubkey", pub,
                                   "--images", str(image_dir), "--out", str(sig_path))
    assert (rc, refused) == (0, []), err
    assert json.loads(out)["kit_verified"] is True
    sig = validate_signature(json.loads(sig_path.read_text()), TINY_BRANCHING)
    assert sig.count == len(images) and sig.run_id == run_id_of(served.run_dir)

    rc, out, err, refused = client("fetch", *registry, "--signature", str(sig_path),
                                   "--out", str(tmp_path / "bundle"))
    assert (rc, refused) == (0, []), err
    printed = json.loads(out)
    assert printed["verified"] is True and len(printed["route"]) == len(TINY_BRANCHING)
    bundle = load_bundle(tmp_path / "bundle", load_public_key(served.pubkey))  # checked here too
    assert list(bundle.route) == printed["route"]

    rc, out, err, refused = client("infer", "--model", str(onnx_path), "--images",
                                   str(image_dir), "--no-progress", "--threads", "1")
    assert (rc, refused) == (0, []), err
    lines = out.strip().splitlines()
    predicted = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in lines[:-1]}
    assert set(predicted) == {p.name for p in images}
    accuracy = np.mean([predicted[p.name] == p.stem[-1] for p in images])
    assert accuracy >= 0.8, f"accuracy {accuracy:.2f} on held-out digits"
    assert lines[-1].startswith(f"{len(images)} image(s) in") and "ONNX Runtime" in lines[-1]


def test_rerank_names_the_missing_extra_before_downloading(client, served, device_files,
                                                           tmp_path):
    """`fetch --rerank` needs torch: one line naming the extra, no traceback, nothing written."""
    _, image_dir, _ = device_files
    sig_path = tmp_path / "signature.json"
    levels = [[1.0 / b] * b for b in TINY_BRANCHING]
    sig_path.write_text(json.dumps({"format": "sdr-signature", "version": 1,
                                    "branching": list(TINY_BRANCHING), "levels": levels,
                                    "count": 10, "run_id": run_id_of(served.run_dir)}))
    rc, out, err, refused = client("fetch", "--server", served.url, "--token", served.token,
                                   "--pubkey", str(served.pubkey), "--signature", str(sig_path),
                                   "--rerank", "rankme", "--images", str(image_dir),
                                   "--out", str(tmp_path / "bundle"))
    assert rc == 2 and out == ""
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("sdr-client fetch: error:") and "pip install 'sdr-edge[rerank]'" in err
    assert "torch" in refused  # probed, refused, reported: never imported
    assert not (tmp_path / "bundle").exists()
