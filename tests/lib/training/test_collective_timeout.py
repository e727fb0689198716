"""Two real gloo processes: a rank-0 step longer than the collective timeout runs outside any
collective (the other rank polls a marker), a failure on rank 0 reaches the other rank at once,
a wait past [train] main_step_timeout_s is one clear error, and the process group's timeout is
the one set on purpose (a barrier alone gives up after collective_timeout_s)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
COLLECTIVE_S = 2.0

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    rank, work = int(os.environ["RANK"]), Path(sys.argv[1])
    (work / f"up{rank}").touch()  # start the process group together: its own setup is timed too
    while not all((work / f"up{r}").exists() for r in range(2)):
        time.sleep(0.05)
    from sdr_edge.training import distributed as dd
    env = dd.setup("cpu", collective_timeout_s=float(sys.argv[2]))
    out = {}

    def long_step():
        time.sleep(2.5 * float(sys.argv[2]))  # longer than any collective may wait
        return "codes"

    t0 = time.monotonic()
    out["long"] = dd.run_on_main(env, long_step, work / "a.done", timeout_s=60, what="k-means")
    out["long_s"] = time.monotonic() - t0

    def boom():
        raise ValueError("boom")

    t0 = time.monotonic()
    try:
        dd.run_on_main(env, boom, work / "b.done", timeout_s=60, what="signature kit")
    except Exception as exc:
        out["failed"] = f"{type(exc).__name__}: {exc}"
    out["failed_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    try:  # rank 1 gives up after 0.5 s; rank 0 then waits for it in a barrier, in vain
        dd.run_on_main(env, lambda: time.sleep(1.0), work / "c.done", timeout_s=0.5,
                       what="k-means")
    except Exception as exc:
        out["gave_up"] = f"{type(exc).__name__}: {exc}"
    out["gave_up_s"] = time.monotonic() - t0
    (work / f"out{rank}.json").write_text(json.dumps(out))
    if rank == 1:
        time.sleep(2 * float(sys.argv[2]) + 1)  # stay alive: rank 0 must hit the timeout itself
    os._exit(0)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank0_steps_run_outside_collectives_with_bounded_waits(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path),
                                       str(COLLECTIVE_S)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    r0, r1 = (json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2))

    # 1. a rank-0 step 2.5x the collective timeout: rank 1 waited outside the group, no error
    assert r0["long"] == "codes" and r1["long"] is None
    assert r1["long_s"] > COLLECTIVE_S
    # 2. rank 0's failure reaches rank 1 through the marker, not after a timeout
    assert r0["failed"] == "ValueError: boom"
    assert r1["failed"].startswith("MainStepError: rank 0's signature kit failed: ValueError: boom")
    assert r1["failed_s"] < 10
    # 3. a wait past main_step_timeout_s is one clear error naming the key ...
    assert r1["gave_up"].startswith("MainStepError: rank 1 waited 0.5 s for rank 0's k-means")
    assert "[train] main_step_timeout_s" in r1["gave_up"]
    # ... and rank 0, left alone in the closing barrier, fails after the collective timeout
    # that was set on purpose (not torch's 30 min default)
    assert "Timed out waiting 2000ms" in r0["gave_up"]  # gloo: the 2 s set via setup()
    assert 1.0 + 0.5 * COLLECTIVE_S < r0["gave_up_s"] < 1.0 + COLLECTIVE_S + 8


def test_timeouts_are_not_part_of_a_run_identity():
    """The error says 'raise [train] main_step_timeout_s': the rerun with a longer timeout must
    resume the same run, not be refused as another one."""
    from sdr_edge.training.config import TrainConfig
    from sdr_edge.training.pipeline import run_identity

    base = TrainConfig()
    longer = base.with_overrides({"train": {"main_step_timeout_s": 99999.0,
                                            "collective_timeout_s": 3600.0}})
    assert run_identity(longer) == run_identity(base)
    assert run_identity(base.with_overrides({"train": {"seed": 1}})) != run_identity(base)
