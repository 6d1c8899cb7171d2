"""Fixtures shared by the curation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_clip(tmp_path_factory) -> str:
    """A small CLIP trained on the demo's digits (~35 s on 2 cores, once per session): `local-dir:…`."""
    from tests.support.digits_clip import train_digits_clip  # noqa: PLC0415 - imports clip_pl: only when asked

    return train_digits_clip(tmp_path_factory.mktemp("digits_clip"))
