"""Read one tar shard (local path or ``pipe:`` command) into raw samples, never raising.

Exact epochs address samples by position (shard, index), so a shard that breaks after ``k`` of its
``n`` manifest samples still yields ``n`` items: the ``k`` samples, then ``n - k`` :class:`Missing`
markers naming why. The markers keep every worker's slice of the epoch aligned with the manifest,
and are counted as ``skipped/<reason>`` like any bad sample.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from clip_pl.data.tarstream import iter_tar

log = logging.getLogger(__name__)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (e.g. __index__), not sample files


@dataclass(frozen=True)
class Missing:
    """Stands for a manifest sample that could not be read."""

    reason: str


def _group(files: Iterator[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive members with the same key as one sample, as webdataset's ``group_by_keys`` groups them
    (key: the name up to the first dot of its last path component; the rest, lower-cased, names the field;
    a name without such a dot is not a sample file; a field twice in one sample is an error). Written
    out because webdataset's version, a dict and a regex match per member, cost ~15 µs a sample: 4 % of a
    worker's time on 256-px shards (benchmarks/loader_bench.py --per-core)."""
    sample: dict[str, Any] | None = None
    for name, data in files:
        if name.startswith("__") and _META.match(name):
            continue
        start = name.rfind("/") + 1
        dot = name.find(".", start)
        if dot <= start:
            continue
        key, field = name[:dot], name[dot + 1 :].lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        elif field in sample:
            raise ValueError(f"{name}: duplicate file name in tar file (field {field!r} of sample {key!r})")
        sample[field] = data
    if sample is not None:
        yield sample


def _samples(url: str) -> Iterator[dict[str, Any]]:
    stream = wds.gopen(url, "rb")
    finished = False
    try:
        yield from _group(iter_tar(stream), url)
        finished = True
    finally:
        try:
            stream.close()  # for pipe: this also checks the command's exit status
        except Exception:
            if finished:
                raise
            # Stopping early (the end of a worker's slice) makes a pipe command die of SIGPIPE: expected.


def read_shard(url: str, expected: int | None = None, counts=None) -> Iterator[dict[str, Any] | Missing]:
    """Yield the shard's samples; with ``expected`` (the manifest size) yield exactly that many items."""
    produced = 0
    try:
        for sample in _samples(url):
            if expected is not None and produced >= expected:
                if counts is not None:
                    counts["skipped/not_in_manifest"] += 1  # sizes.json is stale: reading more would shift every slice
                continue
            produced += 1
            yield sample
    except GeneratorExit:
        raise
    except Exception as e:  # truncated / unreadable tar, failing pipe command, malformed member names
        reason = "unreadable_tar" if produced == 0 else "truncated_tar"
        log.warning("shard %s: %s after %d samples (%s: %s)", url, reason, produced, type(e).__name__, e)
        if expected is None and counts is not None:
            counts[f"skipped/{reason}"] += 1  # without a manifest, only the event can be counted
        if expected is not None:
            for _ in range(expected - produced):
                yield Missing(reason)
            return
    if expected is not None and produced < expected:
        log.warning("shard %s: %d samples but sizes.json says %d", url, produced, expected)
        for _ in range(expected - produced):
            yield Missing("shorter_than_manifest")
