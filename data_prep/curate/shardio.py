"""Samples of WebDataset tar shards, read one by one and copied selectively (no decoding here).

A sample is the run of consecutive tar members sharing a key (the base name up to its first dot),
as webdataset and img2dataset write them.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from data_prep.shards import IMAGE_EXTENSIONS, _sample_key


def shard_names(shards_dir: str | Path) -> list[str]:
    """Stems of the top-level `*.tar` files ('00000', …), sorted; refuses a folder with none."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise FileNotFoundError(
            f"{shards_dir}: no such folder; give the folder of .tar shards (data_prep.download's output)"
        )
    names = sorted(p.stem for p in shards_dir.glob("*.tar"))
    if not names:
        raise FileNotFoundError(f"{shards_dir}: no .tar shards in this folder")
    return names


def check_output_folder(shards_dir: Path, output: Path, overwrite: bool, earlier: str) -> None:
    """Refuse, before any work, an output folder that is the input (its shards are read, not rewritten)
    or that holds an ``earlier`` run's ``stats.json`` without ``overwrite``."""
    if output.resolve() == shards_dir.resolve():
        raise ValueError(
            "the output folder must differ from the shards folder: the input shards are read, not rewritten"
        )
    if (output / "stats.json").exists() and not overwrite:
        raise FileExistsError(f"{output} holds {earlier} (stats.json); pass --overwrite or pick another folder")


def iter_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar, in order."""
    key, files = None, {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _sample_key(member.name)
            if member_key != key and files:
                yield key, files
                files = {}
            key = member_key
            files[ext] = tar.extractfile(member).read()
    if files:
        yield key, files


def keys_in_tar(tar_path: str | Path) -> set[str]:
    """Keys of every sample in a tar (headers only; the contents are skipped)."""
    with tarfile.open(tar_path) as tar:
        return {_sample_key(member.name)[0] for member in tar if member.isfile()}


def image_of(files: dict[str, bytes]) -> bytes | None:
    return next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)


def copy_samples(src: str | Path, dst: str | Path, keep: set[str]) -> int:
    """Write `dst` with the samples of `src` whose key is in `keep` (atomically); returns samples written."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    written = set()
    with tarfile.open(src) as source, tarfile.open(tmp, "w") as target:
        for member in source:
            key = _sample_key(member.name)[0]
            if key in keep:
                target.addfile(member, source.extractfile(member) if member.isfile() else None)
                written.add(key)
    os.replace(tmp, dst)
    return len(written)
