"""Flower's Deployment Engine on one machine: a SuperLink, SuperNodes and `flwr run`.

`Fleet` starts `flower-superlink` and `flower-supernode` (each in its own session, on free
ports, with its own FLWR_HOME), writes the SuperLink connection into the Flower configuration,
runs `flwr run`, and reads the run's final status with `flwr ls --format json` (`flwr run
--stream` exits 0 even when the run failed). The demo and the end-to-end tests use it; a real
fleet runs the same commands on separate machines (docs/federation.md). Logs are kept per
process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from sdr_edge.errors import SdrEdgeError

BIN = Path(sys.executable).parent


class FleetError(SdrEdgeError, RuntimeError):
    """A Flower process did not start, connect or finish; the message carries its logs."""


APP_DIR = Path(__file__).resolve().parents[2]  # the Flower app: this repository
CONNECTION = "local"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def kv_config(values: dict[str, object]) -> str:
    """key=value pairs as Flower's --node-config / --run-config parse them (TOML values)."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


class ProcessGroup:
    """Long-running children, each in its own session with its own log file; `close()` stops
    each whole session (SIGTERM, then SIGKILL), newest first. The demo and `Fleet` use it."""

    def __init__(self, logs: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.cwd = cwd
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env, cwd=self.cwd, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process's whole session (e.g. a SuperNode and what it spawned)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def close(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            del self.procs[name]

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Fleet(ProcessGroup):
    """One SuperLink and its SuperNodes on loopback; always call `close()`."""

    def __init__(self, root: Path, tls_dir: Path | None = None, auth: bool = False,
                 app_dir: Path = APP_DIR) -> None:
        self.root = root
        self.app_dir = app_dir
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.tls_dir = tls_dir
        self.auth = auth
        self.port = free_port()
        env = {**os.environ, "FLWR_HOME": str(self.home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        super().__init__(root / "logs", env, root)
        conn = [f"[superlink]\ndefault = \"{CONNECTION}\"\n",
                f"[superlink.{CONNECTION}]", f"address = \"127.0.0.1:{self.port}\""]
        conn.append(f"root-certificates = \"{tls_dir / 'ca.crt'}\"" if tls_dir else "insecure = true")
        (self.home / "config.toml").write_text("\n".join(conn) + "\n")

    def start_superlink(self) -> None:
        cmd = [str(BIN / "flower-superlink"), "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.tls_dir:
            cmd += ["--ssl-ca-certfile", str(self.tls_dir / "ca.crt"),
                    "--ssl-certfile", str(self.tls_dir / "server.pem"),
                    "--ssl-keyfile", str(self.tls_dir / "server.key")]
        else:
            cmd.append("--insecure")
        if self.auth:
            cmd.append("--enable-supernode-auth")
        self.spawn("superlink", cmd)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "Uvicorn running" in self.log("superlink"):
                return
            if self.procs["superlink"].poll() is not None:
                break
            time.sleep(0.3)
        raise FleetError(f"SuperLink did not start:\n{self.log('superlink')[-3000:]}")

    def start_supernode(self, name: str, node_config: dict[str, object],
                        auth_key: Path | None = None, extra: list[str] | None = None
                        ) -> subprocess.Popen:
        cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
               "--port", str(free_port()), "--node-config", kv_config(node_config)]
        cmd += ["--root-certificates", str(self.tls_dir / "ca.crt")] if self.tls_dir \
            else ["--insecure"]
        if auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(auth_key)]
        return self.spawn(name, cmd + (extra or []))

    def all_logs(self, tail: int = 4000) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.logs.glob("*.log")))

    # -- flwr CLI --------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)

    def flwr_json(self, *args: str) -> dict:
        res = self.flwr(*args, "--format", "json")
        start = res.stdout.find("{")
        if start < 0:
            raise FleetError(f"flwr {' '.join(args)} gave no JSON:\n{res.stdout}\n{res.stderr}")
        return json.loads(res.stdout[start:])

    def online_nodes(self) -> list[dict]:
        res = self.flwr_json("supernode", "ls", CONNECTION)
        return [n for n in res.get("nodes", []) if n.get("status") == "online"]

    def wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.online_nodes()) >= n:
                return
            time.sleep(1)
        raise FleetError(f"{n} SuperNodes did not connect in {timeout} s\n{self.all_logs()}")

    def run_command(self, run_config: dict[str, object]) -> list[str]:
        return [str(BIN / "flwr"), "run", str(self.app_dir), CONNECTION, "--stream",
                "--run-config", kv_config(run_config)]

    def run_app(self, run_config: dict[str, object], timeout: float = 600) -> str:
        """`flwr run . e2e --stream` to the end; returns the streamed output."""
        res = subprocess.run(self.run_command(run_config), env=self.env, cwd=self.root,
                             capture_output=True, text=True, timeout=timeout)
        (self.logs / "flwr-run.log").write_text(res.stdout + res.stderr)
        return res.stdout + res.stderr

    def start_app(self, run_config: dict[str, object]) -> tuple[subprocess.Popen, list[str]]:
        """Start `flwr run --stream` in the background; its lines arrive in the returned list."""
        proc = subprocess.Popen(self.run_command(run_config), env=self.env, cwd=self.root,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
            (self.logs / "flwr-run.log").write_text("".join(lines))

        threading.Thread(target=pump, daemon=True).start()
        self.procs["flwr-run"] = proc
        return proc, lines

    def final_status(self, timeout: float = 60, streamed: str | None = None) -> dict:
        """A run's row from `flwr ls --format json` once it has finished: the last run's, or,
        given `streamed` (the output of `flwr run`), the row of the run it started, found by
        the id it printed (a fleet that served several runs lists them all)."""
        run_id = None
        if streamed is not None:
            match = re.search(r"Successfully started run (\d+)", streamed)
            if match is None:
                raise FleetError(f"flwr run printed no run id:\n{streamed}")
            run_id = match.group(1)
        deadline = time.monotonic() + timeout
        while True:
            runs = self.flwr_json("ls", CONNECTION).get("runs", [])
            if run_id is not None:
                runs = [r for r in runs if str(r.get("run-id")) == run_id]
            if runs and str(runs[-1].get("status", "")).startswith("finished"):
                return runs[-1]
            if time.monotonic() > deadline:
                which = f"run {run_id}" if run_id else "run"
                raise FleetError(f"{which} did not finish: {runs}\n{self.all_logs()}")
            time.sleep(1)
