"""`make demo`: the whole sdr-edge pipeline on builtin:digits, with real processes, in minutes.

Trains a tiny SDRnet (K = 16), starts the registry, lets two clients compute signatures and
fetch their sub-net, fine-tunes it with a Flower federation (a SuperLink and two SuperNodes on
loopback), exports ONNX fp32 and int8, runs inference, prints a summary table and leaves
OUT/report/index.html. Every step is the real command a user would type; every process it
starts is stopped at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from sdr_edge.errors import SdrEdgeError
from sdr_edge.fleet.deployment import ProcessGroup

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLIENTS = ("client-a", "client-b")


class DemoError(SdrEdgeError, RuntimeError):
    """A demo step failed; the message names the step and where its log is."""


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run_step(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 900) -> str:
    """Run one CLI command to completion, echoing it; its output goes to `log`."""
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})}, cwd=REPO)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise DemoError(f"`{cmd[0]} {cmd[1]}` failed (exit {res.returncode}); log: {log}\n"
                        + (res.stderr or res.stdout)[-2000:])
    print(f"   done in {time.perf_counter() - t0:.1f} s (log: {log})", flush=True)
    return res.stdout


def write_client_folders(out: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Split builtin:digits between two clients (label-skewed) as PNG folders with class
    sub-folders: each client gets a `train` folder (its federated data) and a `test` folder."""
    from sdr_edge.data.sources import load_digits_raw
    from sdr_edge.federated.partition import dirichlet_partition

    images, labels = load_digits_raw()
    parts = dirichlet_partition(labels, len(CLIENTS), alpha=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    folders: dict[str, dict[str, Path]] = {}
    for name, idx in zip(CLIENTS, parts, strict=True):
        idx = rng.permutation(idx)
        n_test = max(10, len(idx) // 10)
        folders[name] = {}
        for split, subset in (("test", idx[:n_test]), ("train", idx[n_test:])):
            root = out / "clients" / name / split
            for i in subset:
                path = root / str(labels[i]) / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), images[i])
            folders[name][split] = root
    return folders


class Processes(ProcessGroup):
    """The demo's long-running children (registry), echoed as the command a user would type."""

    def start(self, name: str, cmd: list) -> subprocess.Popen:
        print("$ " + " ".join(shlex.quote(str(c)) for c in cmd) + " &", flush=True)
        return self.spawn(name, cmd)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"registry exited early; log: {log}\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise DemoError(f"registry did not answer /healthz within {timeout:.0f} s; log: {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.toml")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    procs = Processes(logs, dict(os.environ), REPO)
    t_start = time.perf_counter()
    summary: dict = {}
    try:
        summary = pipeline(out, args.config.resolve(), args.rounds, procs, logs)
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.close()
    summary["total_seconds"] = time.perf_counter() - t_start
    from .demo_report import print_summary, write_demo_report

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    index = write_demo_report(out, summary)
    print_summary(summary)
    print(f"\nreport: {index}")
    return 0


def pipeline(out: Path, config: Path, rounds: int, procs: Processes, logs: Path) -> dict:
    exe = {name: BIN / name for name in ("sdr-server", "sdr-client", "sdr-export")}
    run_dir, keys = out / "run", out / "keys"
    summary: dict = {"steps": {}}

    def timed(step: str, fn):
        t0 = time.perf_counter()
        result = fn()
        summary["steps"][step] = round(time.perf_counter() - t0, 1)
        return result

    say("1/7 pre-train a tiny SDRnet on builtin:digits (K = 16)")
    timed("train", lambda: run_step([exe["sdr-server"], "train", "--data", "builtin:digits",
                                     "--config", config, "--out", run_dir], logs / "train.log"))

    say("2/7 server keys, a client token, the registry")
    if not (keys / "server.key").exists():
        run_step([exe["sdr-server"], "keygen", "--out", keys], logs / "keygen.log")
    tokens = keys / "tokens.txt"
    tokens.unlink(missing_ok=True)
    token = run_step([exe["sdr-server"], "token", "--tokens", tokens, "--name", "demo-fleet"],
                     logs / "token.log").strip().splitlines()[-1].strip()
    (keys / "client.token").write_text(token + "\n")
    from sdr_edge.fleet.deployment import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    registry = procs.start("registry", [exe["sdr-server"], "serve", "--run", run_dir, "--port",
                                        str(port), "--tokens", tokens, "--key",
                                        keys / "server.key"])
    wait_healthy(url, registry, logs / "registry.log")

    say("3/7 two clients: local data, signature, fetch their sub-net")
    folders = write_client_folders(out)
    clients: dict[str, dict] = {}
    for name in CLIENTS:
        cdir = out / "clients" / name
        run_step([exe["sdr-client"], "fetch", "--kit", "--server", url, "--token-file",
                  keys / "client.token", "--pubkey", keys / "server.pub", "--out", cdir / "kit"],
                 logs / f"{name}-kit.log")
        run_step([exe["sdr-client"], "signature", "--kit", cdir / "kit", "--pubkey",
                  keys / "server.pub", "--images", folders[name]["train"], "--out",
                  cdir / "signature.json"],
                 logs / f"{name}-signature.log")
        run_step([exe["sdr-client"], "fetch", "--server", url, "--token-file",
                  keys / "client.token", "--signature", cdir / "signature.json", "--pubkey",
                  keys / "server.pub", "--out", cdir / "bundle"], logs / f"{name}-fetch.log")
        sig = json.loads((cdir / "signature.json").read_text())
        manifest = json.loads((cdir / "bundle" / "manifest.json").read_text())
        clients[name] = {"images": sig["count"], "route": manifest["route"],
                         "signature_bytes": (cdir / "signature.json").stat().st_size,
                         "level1": sig["levels"][0]}
    summary["clients"] = clients

    say("4/7 federated fine-tuning: SuperLink + 2 SuperNodes on loopback, FedAvg")
    from .demo_federation import FederationFailed, run_federation

    try:
        summary["federation"] = timed("federation", lambda: run_federation(
            out, run_dir, keys, folders, rounds))
    except FederationFailed as exc:
        raise DemoError(f"federation failed: {exc}") from exc
    bundle = out / "federated" / "bundle"

    say("5/7 export ONNX fp32 and int8 (parity-checked against PyTorch)")
    exports = {}
    calib = folders[CLIENTS[0]]["train"]
    for precision in ("fp32", "int8"):
        model = out / "export" / f"model-{precision}.onnx"
        cmd = [exe["sdr-export"], "onnx", "--bundle", bundle, "--pubkey", keys / "server.pub",
               "--out", model, "--precision", precision, "--no-progress",
               "--eval-source", folders[CLIENTS[1]]["test"]]
        if precision == "int8":
            cmd += ["--calib-images", calib]
        timed(f"export_{precision}", lambda cmd=cmd, p=precision: run_step(
            cmd, logs / f"export-{p}.log"))
        exports[precision] = json.loads(model.with_suffix(".json").read_text())
    summary["exports"] = exports

    say("6/7 on-device inference with ONNX Runtime (OpenCV preprocessing)")
    infer = {}
    for precision in ("fp32", "int8"):
        text = run_step([exe["sdr-client"], "infer", "--model",
                         out / "export" / f"model-{precision}.onnx", "--images",
                         folders[CLIENTS[1]]["test"], "--json", "--no-progress"],
                        logs / f"infer-{precision}.log")
        infer[precision] = json.loads(text)
    summary["infer"] = infer

    say("7/7 stop the registry")
    procs.close()
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
