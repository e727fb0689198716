"""Registry load test: concurrent async clients against a real `sdr-server serve` on loopback.

Starts the registry as its own process (on a tiny run dir it builds, or --run), then for each
endpoint runs --clients concurrent httpx.AsyncClient loops for --seconds (closed loop: each
client sends its next request when the previous one is answered; --rate R makes each client
open-loop at R requests/s, latency measured from the scheduled send time so a slow server is
not hidden). Prints JSON: throughput, p50/p90/p99/max latency and errors per endpoint, the
first (cold, extract-and-sign) bundle request, and bytes of one bundle against the whole
SDRnet checkpoint. The load generator shares the machine's cores with the server: say so
when quoting the figures.

    nice .venv/bin/python benchmarks/registry_load.py [--clients 50] [--seconds 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny run builder and the process helper

from helpers_registry import serve_registry  # noqa: E402
from helpers_rundir import build_tiny_run  # noqa: E402

TARGET_ROUTE_P99_MS = 20.0


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants (uvicorn workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def signature_bodies(branching: list[int], n: int, seed: int = 0,
                     run_id: str | None = None) -> list[bytes]:
    """Distinct valid signatures (Dirichlet per level), as the JSON a client would POST."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n):
        levels = [np.round(rng.dirichlet(np.ones(b)), 6) for b in branching]
        levels = [(lv / lv.sum()).tolist() for lv in levels]
        bodies.append(json.dumps({"format": "sdr-signature", "version": 1,
                                  "branching": branching, "levels": levels, "run_id": run_id,
                                  "count": int(rng.integers(10, 1000))}).encode())
    return bodies


def summarize(latencies_ms: list[float], errors: int, seconds: float,
              error_kinds: dict[str, int]) -> dict:
    lat = np.asarray(latencies_ms) if latencies_ms else np.asarray([np.nan])
    return {"requests": len(latencies_ms) + errors, "ok": len(latencies_ms), "errors": errors,
            "error_kinds": error_kinds, "seconds": round(seconds, 2),
            "throughput_rps": round(len(latencies_ms) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "max_ms": round(float(lat.max()), 2)}


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a load generator that costs the
    shared CPU far less per request than httpx, so more of it is left to the server."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> RawResponse:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        assert self.reader is not None
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                          if line.lower().startswith("content-length:"))
            await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, StopIteration, ValueError, OSError) as exc:
            await self.close()
            raise httpx.TransportError(f"raw connection failed: {exc!r}") from exc
        return RawResponse(status)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class RawResponse:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


async def load(url: str, token: str, clients: int, seconds: float, rate: float,
               make_request, desc: str, raw: bool = False) -> dict:
    """Run `clients` loops for `seconds`; make_request(client, i) -> awaitable response."""
    latencies: list[float] = []
    error_kinds: dict[str, int] = {}
    parts = httpx.URL(url)
    # Clients are made before the clock starts: an httpx client builds an SSL context (tens
    # of ms of CPU) even for http://, which is set-up, not serving.
    ssl_context = ssl.create_default_context()
    if raw:
        clients_list = [RawConnection(parts.host, parts.port, token) for _ in range(clients)]
    else:
        clients_list = [httpx.AsyncClient(base_url=url, timeout=30.0, verify=ssl_context,
                                          headers={"Authorization": f"Bearer {token}"})
                        for _ in range(clients)]
    start = time.perf_counter()
    stop = start + seconds
    bar = tqdm(desc=desc, unit="req", leave=False, mininterval=1.0)

    async def client_loop(cid: int, client) -> None:
        i = 0
        next_send = time.perf_counter() + (cid / clients / rate if rate else 0.0)
        while True:
            if rate:
                now = time.perf_counter()
                if next_send > now:
                    await asyncio.sleep(next_send - now)
                sent = next_send
                next_send += 1.0 / rate
            else:
                sent = time.perf_counter()
            if sent >= stop:
                return
            try:
                response = await make_request(client, cid * 1_000_003 + i)
                ok = response.status_code == 200
                kind = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                ok, kind = False, type(exc).__name__
            if ok:
                latencies.append((time.perf_counter() - sent) * 1000.0)
            else:
                error_kinds[kind] = error_kinds.get(kind, 0) + 1
            bar.update(1)
            i += 1

    try:
        await asyncio.gather(*(client_loop(c, client) for c, client in enumerate(clients_list)))
        elapsed = time.perf_counter() - start
    finally:
        bar.close()
        for client in clients_list:
            await (client.close() if raw else client.aclose())
    return summarize(latencies, sum(error_kinds.values()), elapsed, error_kinds)


async def run_benchmark(reg, args: argparse.Namespace) -> dict:
    auth = {"Authorization": f"Bearer {reg.token}"}
    async with httpx.AsyncClient(base_url=reg.url, headers=auth, timeout=60.0) as client:
        info = (await client.get("/v1/info")).json()
        branching = info["branching"]
        bodies = signature_bodies(branching, 512, run_id=info.get("run_id"))
        routes = sorted({tuple((await client.post("/v1/route", content=b)).json()["route"])
                         for b in bodies[:64]})[:args.routes]
        ids = ["-".join(map(str, r)) for r in routes]
        t0 = time.perf_counter()
        first = await client.get(f"/v1/subnets/{ids[0]}")
        cold_ms = (time.perf_counter() - t0) * 1000.0
        first.raise_for_status()
        for rid in ids[1:]:  # warm the cache: the load phase measures serving, not extraction
            (await client.get(f"/v1/subnets/{rid}")).raise_for_status()
        bundle_bytes = len(first.content)
    headers = {"Content-Type": "application/json"}

    def post_route(c, i: int):
        if isinstance(c, RawConnection):
            return c.request("POST", "/v1/route", bodies[i % len(bodies)])
        return c.post("/v1/route", content=bodies[i % len(bodies)], headers=headers)

    def get_subnet(c, i: int):
        if isinstance(c, RawConnection):
            return c.request("GET", f"/v1/subnets/{ids[i % len(ids)]}")
        return c.get(f"/v1/subnets/{ids[i % len(ids)]}")

    results = {}
    for name, make in (("POST /v1/route", post_route), ("GET /v1/subnets/{route}", get_subnet)):
        server0, own0 = process_cpu_seconds(reg.pid), own_cpu_seconds()
        results[name] = await load(reg.url, reg.token, args.clients, args.seconds, args.rate,
                                   make, name, raw=args.client == "raw")
        results[name]["server_cpu_s"] = round(process_cpu_seconds(reg.pid) - server0, 2)
        results[name]["load_generator_cpu_s"] = round(own_cpu_seconds() - own0, 2)
    route = results["POST /v1/route"]
    files = {p.name: p.stat().st_size for p in (reg.cache_dir / ids[0]).iterdir()}
    sdrnet = (reg.run_dir / "sdrnet.safetensors").stat().st_size
    return {
        "endpoints": results,
        "cold_first_bundle_ms": round(cold_ms, 1),
        "sizes": {"bundle_archive_bytes": bundle_bytes, "bundle_files_bytes": files,
                  "bundle_total_bytes": sum(files.values()), "sdrnet_checkpoint_bytes": sdrnet,
                  "bundle_over_sdrnet": round(sum(files.values()) / sdrnet, 4),
                  "branching": branching, "num_subnets": info["num_subnets"]},
        "target": {"route_p99_ms": TARGET_ROUTE_P99_MS,
                   "met": route["p99_ms"] <= TARGET_ROUTE_P99_MS and route["errors"] == 0},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run dir to serve (default: build a tiny one)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="per endpoint")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests/s per client (0: closed loop, as fast as answered)")
    parser.add_argument("--routes", type=int, default=16, help="distinct bundles requested")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--uvloop", action="store_true", help="run the load generator on uvloop")
    parser.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                        help="httpx.AsyncClient, or raw keep-alive HTTP/1.1 on asyncio streams "
                             "(cheaper, leaves more CPU to the server)")
    args = parser.parse_args()
    if args.clients < 1 or args.seconds <= 0 or args.rate < 0:
        parser.error("--clients and --seconds must be positive, --rate non-negative")
    with tempfile.TemporaryDirectory(prefix="registry-load-") as tmp:
        tmp_path = Path(tmp)
        run_dir = args.run or build_tiny_run(tmp_path / "run", with_kit=False)
        with serve_registry(run_dir, tmp_path / "srv", ("--workers", str(args.workers))) as reg:
            if args.uvloop:
                import uvloop

                result = uvloop.run(run_benchmark(reg, args))
            else:
                result = asyncio.run(run_benchmark(reg, args))
    result["config"] = {"clients": args.clients, "seconds_per_endpoint": args.seconds,
                        "rate_per_client": args.rate or "closed loop", "workers": args.workers,
                        "load_generator": ("httpx.AsyncClient" if args.client == "httpx"
                                           else "raw asyncio HTTP/1.1")
                        + (" on uvloop" if args.uvloop else ""),
                        "run": str(args.run) if args.run else "tiny (built)",
                        "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
                        "python": platform.python_version()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
