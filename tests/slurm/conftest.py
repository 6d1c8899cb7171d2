"""The session's SLURM cluster (tests/slurm/cluster.py): started once, reused if already running.

Where the cluster cannot run at all (not root, slurm-wlm/munge not installed) the tests skip with
that reason, except under CI=true, where they fail: CI installs the packages (.ci/run), so a
missing cluster there is a broken pipeline, not a limitation. A cluster that starts but does not
come up is always an error.
"""

from __future__ import annotations

import os

import pytest

from tests.slurm.cluster import Cluster, ClusterUnavailable, ensure_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Cluster:
    try:
        cluster = ensure_cluster()
    except ClusterUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true, yet the loopback SLURM cluster cannot run: {exc}")
        pytest.skip(f"loopback SLURM cluster unavailable: {exc}")
    yield cluster
    # Every test cancels its own jobs, so jobs still queued belong to another session sharing this
    # cluster: leave it up for them (it stops with `python -m tests.slurm.cluster down`).
    # A cluster someone else started stays up for them too.
    if cluster.started_here and not cluster.active_jobs():
        cluster.stop()
