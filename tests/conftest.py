"""What every test shares. Helpers that tests import live in ``tests/support/`` (gloo process groups,
fake shards, tiny towers, composed configs, evaluation fixtures); the folders mirror the package
(``tests/data`` ↔ ``clip_pl/data``, ``tests/eval``, ``tests/callbacks``, ``tests/data_prep``,
``tests/slurm`` for the real loopback cluster)."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Nothing may be downloaded at run time: the Hugging Face libraries (transformers, open_clip's
    # hub calls) fail at once instead of trying the network. Set before any test imports them, and
    # inherited by every subprocess a test starts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), keep together what shares a
    fixture built once: a file's tests (its module-scoped fixtures: the strategy matrix, trained
    checkpoints, shard sets), every test of the loopback SLURM cluster (one cluster, one worker),
    and every test that asks for the session's digits CLIP. The longest groups go first, so the
    two workers finish together instead of one waiting on the other's last long file."""
    if not hasattr(config, "workerinput"):
        return  # not an xdist worker (whose collection the scheduler groups): nothing to keep together
    for item in items:
        if "slurm" in item.keywords:
            group = "slurm"
        elif "digits_clip" in getattr(item, "fixturenames", ()):
            group = "digits_clip"
        else:
            group = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: _LONG_GROUPS_FIRST.get(_group_of(item), len(_LONG_GROUPS_FIRST)))


def _group_of(item: pytest.Item) -> str:
    return next(m.kwargs.get("name", m.args[0] if m.args else "") for m in item.iter_markers("xdist_group"))


# Groups that take minutes on 2 cores, longest first (from `--durations`); the rest keep their order.
_LONG_GROUPS_FIRST = {
    name: rank
    for rank, name in enumerate(
        [
            "slurm",
            "tests/test_strategies.py",
            "tests/test_demo.py",
            "tests/test_resume_matrix.py",
            "digits_clip",
        ]
    )
}
