"""Start `sdr-server serve` as a real process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from sdr_edge.fleet.deployment import free_port

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Registry:
    url: str
    run_dir: Path
    cache_dir: Path
    token: str
    pubkey: Path
    log_path: Path
    cacert: Path | None = None
    pid: int | None = None

    @property
    def tokens_file(self) -> Path:
        return self.pubkey.parent / "tokens.txt"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_credentials(folder: Path) -> tuple[Path, Path, Path, str]:
    """server.key / server.pub / tokens.txt in `folder`, and one token."""
    from sdr_edge.artifacts.signing import generate_keypair
    from sdr_edge_server.registry.auth import create_token

    folder.mkdir(parents=True, exist_ok=True)
    generate_keypair(folder / "server.key", folder / "server.pub")
    token = create_token(folder / "tokens.txt", "tests")
    return folder / "server.key", folder / "server.pub", folder / "tokens.txt", token


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, cacert: Path | None,
                  timeout: float) -> None:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(cacert)) if cacert \
        else True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sdr-server serve exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", verify=verify, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"registry at {url} not healthy after {timeout:.0f}s:\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")


@contextmanager
def serve_registry(run_dir: Path, workdir: Path, extra_args: tuple[str, ...] = (),
                   tls: tuple[Path, Path] | None = None, cacert: Path | None = None,
                   timeout: float = 90.0) -> Iterator[Registry]:
    """Run `sdr-server serve` until the block ends (SIGINT, then SIGKILL if it hangs)."""
    key, pub, tokens, token = make_credentials(workdir / "creds")
    port = free_port()
    cache = workdir / "cache"
    log_path = workdir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "sdr_edge_server.cli", "serve", "--run", str(run_dir), "--host",
           "127.0.0.1", "--port", str(port), "--tokens", str(tokens), "--key", str(key),
           "--cache-dir", str(cache), *extra_args]
    if tls is not None:
        cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    scheme = "https" if tls is not None else "http"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path, cacert, timeout)
        yield Registry(url, run_dir, cache, token, pub, log_path, cacert, proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
