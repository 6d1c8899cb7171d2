"""The key files of ``data.record_keys=true``: ``RUN_DIR/keys/rank<r>.jsonl``, one line per optimizer
step with the ``__key__`` of every sample the rank trained on, for ``python -m clip_pl.data.audit``.

    {"step": 12, "epoch": 0, "keys": ["000010003", …], "bad": {"skipped/corrupt_image": 1, "refilled": 1}}

``clip_pl.callbacks.keys.KeyRecorder`` writes them; this module names and reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def rank_file(keys_dir: str | os.PathLike, rank: int) -> Path:
    return Path(keys_dir) / f"rank{rank}.jsonl"


def read_lines(path: str | os.PathLike) -> list[dict]:
    """The complete lines of a key file (a process killed mid-write may leave a partial last line)."""
    records = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records
