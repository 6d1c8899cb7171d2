"""slurm/launch.sh's MASTER_PORT stays out of Linux's ephemeral port range for every job id.

The rendezvous port is derived from the job id so that jobs sharing a node do not collide; if it
could land in the ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default), any
outgoing connection on the first node could already hold it and the job would fail to start.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _port_line() -> str:
    lines = [
        line
        for line in (REPO / "slurm" / "launch.sh").read_text().splitlines()
        if re.match(r"\s*export MASTER_PORT=", line)
    ]
    assert len(lines) == 1, lines
    return re.search(r'export MASTER_PORT="[^"]*"', lines[0]).group(0)  # without a trailing comment


def _ports(job_ids: list[int], preset: str | None = None) -> list[int]:
    """Evaluate launch.sh's own line in bash for each job id (ids on stdin)."""
    script = (
        f"while read -r SLURM_JOB_ID; do unset MASTER_PORT; "
        f"{'MASTER_PORT=' + preset + ';' if preset else ''} {_port_line()}; echo $MASTER_PORT; done"
    )
    out = subprocess.run(
        ["bash", "-c", script], input="\n".join(map(str, job_ids)) + "\n", capture_output=True, text=True, check=True
    ).stdout
    return [int(p) for p in out.split()]


def _ephemeral_low() -> int:
    try:
        return min(32768, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    except OSError:
        return 32768  # Linux's default low end


def test_master_port_is_below_the_ephemeral_range_for_every_job_id():
    # every residue of the formula: 40 000 consecutive ids cover any modulus up to 40 000
    ports = _ports(list(range(1, 40_001, 3)) + [19_999, 20_000, 39_999, 10**9 + 7])
    assert min(ports) >= 1024 and max(ports) < _ephemeral_low(), (min(ports), max(ports))
    assert len(set(_ports([1000, 1001]))) == 2  # neighbouring jobs on one node get different ports


def test_a_master_port_exported_before_sbatch_wins():
    assert _ports([123], preset="29555") == [29555]
