"""Submitting and watching jobs on the test cluster, every wait bounded."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.slurm.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def sbatch(
    cluster: Cluster,
    script: Path,
    sbatch_args: Iterable[str],
    overrides: Iterable[str] = (),
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    typed: str = "",
) -> str:
    """Submit ``script`` as a user would (from ``cwd``); return the job id. ``typed``: more overrides as
    shell text, e.g. ``data.train_shards='/data/{00000..00003}.tar'`` as the README types it; the command
    line then runs through ``bash -c``, which takes its quotes off."""
    cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *overrides]
    if typed:
        cmd = ["bash", "-c", f"{shlex.join(cmd)} {typed}"]
    proc = subprocess.run(cmd, cwd=cwd, env={**cluster.env, **(env or {})}, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
    return proc.stdout.strip().split(";")[0]


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no log at {path})"


def wait_until(
    what: str, predicate: Callable[[], object], timeout: float, diagnose: Callable[[], str], poll: float = 0.5
):
    """Return predicate()'s first truthy value; fail with ``diagnose()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")


def wait_finished(cluster: Cluster, job_id: str, timeout: float, log: Path) -> dict[str, str]:
    """Wait for a terminal state; return `scontrol show job`'s fields."""

    def finished():
        fields = cluster.job_fields(job_id)
        return fields if fields.get("JobState") in TERMINAL else None

    def diagnose():
        cluster.run("scancel", job_id, check=False)
        return f"scontrol: {cluster.job_fields(job_id)}\njob log {log}:\n{log_tail(log)}"

    return wait_until(f"job {job_id} to finish", finished, timeout, diagnose)
