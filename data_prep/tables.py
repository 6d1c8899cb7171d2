"""Read a WebImageText-style table (one row per image: url, caption, extra columns) and check it.

Every problem is raised as `InputTableError` with what to do about it, before any download.
Formats: parquet, csv, tsv, jsonl (optionally .gz for the text ones), or a folder of such files.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

FORMATS = ("parquet", "csv", "tsv", "jsonl")
# Columns img2dataset writes itself; an input column of the same name cannot be carried through.
RESERVED_COLUMNS = frozenset(
    {
        "key",
        "caption",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
        "exif",
        "md5",
        "sha256",
        "sha512",
    }
)


class InputTableError(ValueError):
    """The input table cannot be used; the message says why and what to change."""


def format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix == "json":
        suffix = "jsonl"  # one JSON object per line is the only JSON layout img2dataset streams
    if suffix not in FORMATS:
        raise InputTableError(
            f"{path}: unsupported table format {suffix or '(no extension)'!r}; "
            f"give a .parquet, .csv, .tsv or .jsonl file (text formats may be .gz)"
        )
    return suffix


def _read_one(path: Path, fmt: str) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise InputTableError(f"{path}: the file is empty; give a table with a header and at least one row")
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        if fmt == "csv":
            return pd.read_csv(path)
        if fmt == "tsv":
            return pd.read_csv(path, sep="\t")
        return pd.read_json(path, lines=True)
    except InputTableError:
        raise
    except Exception as err:  # pandas/pyarrow raise many types; all mean "not this format"
        raise InputTableError(
            f"{path}: could not be read as {fmt} ({type(err).__name__}: {err}); "
            f"check that the file really is {fmt} or rename it to its real format"
        ) from err


def input_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise InputTableError(f"{path}: no such file or folder; give the path of the url/caption table")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputTableError(f"{path}: the folder holds no table files")
    formats = {format_of(p) for p in files}
    if len(formats) > 1:
        raise InputTableError(f"{path}: the folder mixes table formats {sorted(formats)}; keep one format per folder")
    return files


def read_table(path: str | Path, url_col: str = "url", caption_col: str = "caption") -> pd.DataFrame:
    """The whole table as one DataFrame, with the url and caption columns checked to exist."""
    frames = []
    for file in input_files(path):
        frame = _read_one(file, format_of(file))
        missing = [c for c in (url_col, caption_col) if c not in frame.columns]
        if missing:
            raise InputTableError(
                f"{file}: missing column(s) {missing}; it has {list(map(str, frame.columns))}. "
                f"Rename them or pass --url-col / --caption-col"
            )
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if len(table) == 0:
        raise InputTableError(f"{path}: the table has a header but no rows; nothing to download")
    return table


def extra_columns(table: pd.DataFrame, url_col: str, caption_col: str, keep: list[str] | None):
    """(columns to carry into each sample's .json, columns that cannot be carried and why).

    keep=None carries every extra column that img2dataset does not reserve; an explicit list must
    name existing, unreserved columns.
    """
    extras = [str(c) for c in table.columns if c not in (url_col, caption_col)]
    if keep is None:
        kept = [c for c in extras if c not in RESERVED_COLUMNS]
        return kept, {c: "name reserved by img2dataset" for c in extras if c in RESERVED_COLUMNS}
    unknown = [c for c in keep if c not in extras]
    if unknown:
        raise InputTableError(f"--keep-columns names {unknown}, which the table does not have (it has {extras})")
    reserved = [c for c in keep if c in RESERVED_COLUMNS]
    if reserved:
        raise InputTableError(f"--keep-columns {reserved}: img2dataset reserves these names; rename the columns first")
    return list(keep), {c: "not in --keep-columns" for c in extras if c not in keep}
