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
