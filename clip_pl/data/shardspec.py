"""Shard specs → the shards of a dataset, with their sample counts and per-source sampling weights.

A spec is one string or a list of strings. In a string, ``::`` separates *sources*; each source is

* a directory holding ``*.tar`` shards and a ``sizes.json`` manifest (the img2dataset / demo
  layout ``DIR/shards/*.tar + sizes.json``): its shards are the manifest's keys;
* a brace pattern, local or remote: ``/data/cc3m/{00000..00331}.tar``,
  ``pipe:aws s3 cp s3://bucket/laion/{00000..41455}.tar -``;
* a glob of local files: ``/data/cc3m/*.tar``.

Training and evaluation read the same grammar (``resolve_shards``); evaluation has no sampling
weights, so there ``::`` only joins sources into one set.

Sample counts come from a ``sizes.json`` (``{"00000.tar": n, ...}``): the one named by
``sizes_file`` (a path, or a ``::`` list with one path per source), else the one next to the
source's local shards. Remote shards (``pipe:``) need ``sizes_file`` for exact epochs.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import braceexpand

SIZES_FILE_NAME = "sizes.json"
_TAR_TOKEN = re.compile(r"[^\s'\"]+\.tar\b")


@dataclass(frozen=True)
class Shard:
    url: str  # local path or webdataset URL (pipe:..., http://...)
    size: int | None  # samples in the shard per the manifest; None when no manifest knows it
    source: int  # index of the ``::`` source it came from


@dataclass(frozen=True)
class ShardSet:
    shards: tuple[Shard, ...]
    weights: tuple[float, ...]  # one per source, for resampled mode

    @property
    def num_sources(self) -> int:
        return len(self.weights)

    @property
    def sizes_known(self) -> bool:
        return all(s.size is not None for s in self.shards)

    @property
    def total_samples(self) -> int | None:
        return sum(s.size for s in self.shards) if self.sizes_known else None  # type: ignore[misc]

    def missing_sizes(self) -> list[str]:
        return [s.url for s in self.shards if s.size is None]


def split_sources(spec: str | Sequence[str], setting: str = "data.train_shards") -> list[str]:
    parts = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    sources = [p.strip() for part in parts for p in os.fspath(part).split("::") if p.strip()]
    if not sources:
        raise ValueError(
            f"the shard spec is empty; set {setting} to a directory, "
            "a brace pattern such as /data/{00000..00099}.tar, or several joined with '::'."
        )
    return sources


def parse_weights(weights: str | float | Sequence[float] | None, num_sources: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * num_sources
    if isinstance(weights, str):
        values = [float(w) for w in weights.split("::")]
    elif isinstance(weights, (int, float)):
        values = [float(weights)]
    else:
        values = [float(w) for w in weights]
    if len(values) != num_sources:
        raise ValueError(
            f"data: {len(values)} sampling weights for {num_sources} '::'-joined sources; "
            "give one weight per source (e.g. data.train_weights='1::3')."
        )
    if any(not w > 0 for w in values):
        raise ValueError(f"data: sampling weights must be > 0, got {values}.")
    return tuple(values)


def shard_name(url: str) -> str:
    """The file name a manifest knows a shard by: ``00012.tar`` for a path or a pipe command."""
    if url.startswith("pipe:"):
        tokens = _TAR_TOKEN.findall(url)
        return os.path.basename(tokens[-1]) if tokens else url
    return os.path.basename(url.split("?")[0])


def read_manifest(path: str) -> dict[str, int]:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"data: cannot read the sizes manifest {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f'data: {path} must map shard file names to sample counts, e.g. {{"00000.tar": 10000}}.')
    return {os.path.basename(k): int(v) for k, v in raw.items()}


def is_remote(url: str) -> bool:
    """A ``pipe:`` command or a URL (``s3://``, ``https://`` …): read by webdataset, not a local path."""
    return url.startswith("pipe:") or "://" in url


_PATTERN_CHARS = "{*?["


def _missing_part(source: str) -> str | None:
    """The path that a local source names and the file system lacks, or None (see check_sources_exist)."""
    patterns = [source.index(c) for c in _PATTERN_CHARS if c in source]
    if not patterns:
        return None if os.path.exists(source) else source
    folder = os.path.dirname(source[: min(patterns)]) or "."
    if not os.path.isdir(folder):
        return folder
    first = next(iter(braceexpand.braceexpand(source)))  # a brace pattern's first shard: one stat
    if "{" in source and not any(c in first for c in "*?[") and not os.path.exists(first):
        return first
    return None


def check_sources_exist(spec: str | Sequence[str], setting: str = "data.train_shards") -> None:
    """Refuse, cheaply, a spec whose local sources cannot exist: a folder or file that is not there, or a
    brace pattern or glob whose fixed folder is not (or a brace pattern whose first shard is not).
    One or two stats per source, so every rank can afford it before anything is built; ``resolve_shards``
    (rank 0, at setup) still lists and checks every shard. Remote sources (``pipe:``, URLs) are not
    checked: only reading them tells. Raises FileNotFoundError naming ``setting``, the value and the fix."""
    sources = split_sources(spec, setting)
    for source in sources:
        missing = None if is_remote(source) else _missing_part(source)
        if missing is None:
            continue
        given = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]
        where = "" if os.path.isabs(missing) else f" (relative to the current directory {os.getcwd()})"
        part = f"its source {source!r} " if len(sources) > 1 else ""
        raise FileNotFoundError(
            f"{setting}={given!r}: {part}names {missing}, which does not exist{where}. Give the folder of the "
            f"shards (with its {SIZES_FILE_NAME}), a brace pattern such as /data/cc3m/{{00000..00331}}.tar, a glob "
            f"or a pipe: command; `python -m data_prep.download` makes shards (the demo's: "
            f"`python -m data_prep.demo --out demo_out/corpus`)."
        )


def _expand_source(source: str, setting: str) -> tuple[list[str], str | None]:
    """(shard urls, manifest path next to them or None)."""
    if not is_remote(source) and os.path.isdir(source):
        manifest = os.path.join(source, SIZES_FILE_NAME)
        if os.path.exists(manifest):
            names = sorted(read_manifest(manifest))
        else:
            names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(source, "*.tar")))
        if not names:
            raise FileNotFoundError(f"{setting}: directory {source} holds no .tar shards (and no {SIZES_FILE_NAME}).")
        return [os.path.join(source, n) for n in names], (manifest if os.path.exists(manifest) else None)
    urls = list(braceexpand.braceexpand(source))
    if len(urls) == 1 and any(c in source for c in "*?[") and not source.startswith("pipe:"):
        urls = sorted(glob.glob(source))
        if not urls:
            raise FileNotFoundError(f"{setting}: the glob {source} matches no file.")
    local = [u for u in urls if not is_remote(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(
            f"{setting}: {len(missing)} of {len(urls)} shards do not exist in {source!r} "
            f"(first: {missing[0]}); fix the path or the brace range."
        )
    manifest = None
    if local:
        candidate = os.path.join(os.path.dirname(local[0]), SIZES_FILE_NAME)
        manifest = candidate if os.path.exists(candidate) else None
    return urls, manifest


def resolve_shards(
    spec: str | Sequence[str],
    weights=None,
    sizes_file: str | Sequence[str] | None = None,
    setting: str = "data.train_shards",
) -> ShardSet:
    """Expand a spec into shards with sizes; raises before any data is read if the spec is wrong.
    ``setting`` is the config key the spec came from, for the error messages."""
    sources = split_sources(spec, setting)
    weight_values = parse_weights(weights, len(sources))
    manifests: list[str | None]
    if sizes_file is None:
        manifests = [None] * len(sources)
    else:
        listed = split_sources(sizes_file)
        if len(listed) == 1:
            listed = listed * len(sources)
        if len(listed) != len(sources):
            raise ValueError(
                f"data.sizes_file lists {len(listed)} manifests for {len(sources)} sources; "
                "give one, or one per '::' source."
            )
        manifests = list(listed)
    shards: list[Shard] = []
    for index, source in enumerate(sources):
        urls, found = _expand_source(source, setting)
        manifest_path = manifests[index] or found
        sizes = read_manifest(manifest_path) if manifest_path else {}
        shards.extend(Shard(url=u, size=sizes.get(shard_name(u)), source=index) for u in urls)
    return ShardSet(shards=tuple(shards), weights=weight_values)


def resolve_shards_once(
    spec: str | Sequence[str],
    weights=None,
    sizes_file: str | Sequence[str] | None = None,
    setting: str = "data.train_shards",
) -> ShardSet:
    """:func:`resolve_shards` on rank 0 only, its result (or its error) broadcast to every rank.

    Listing and stat-ing the shards on every rank costs ranks × shards file-system calls at start
    (LAION-400M on 256 GPUs: 41 456 × 256 = 10.6 M on a shared file system, all at once). Call it on
    every rank together (a collective), e.g. from ``LightningDataModule.setup``; without a process
    group it is :func:`resolve_shards`.
    """
    import torch.distributed as dist

    from clip_pl.distributed import rank_and_world_size

    rank, world = rank_and_world_size()
    if world == 1:
        return resolve_shards(spec, weights, sizes_file, setting)
    payload: list = [None]
    if rank == 0:
        try:
            payload = [("ok", resolve_shards(spec, weights, sizes_file, setting))]
        except Exception as e:  # every rank raises it, not only rank 0 (the others would wait forever)
            payload = [("error", e)]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value
