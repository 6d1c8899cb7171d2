"""MetaCLIP/WIT-style balancing of a url/caption table against metadata entries, in two streaming passes.

CLIP's WebImageText was built from ~500 000 queries with at most ~20 000 pairs each; MetaCLIP
(Xu et al., 2023) made that reproducible, and this follows it:

1. every caption is matched against the metadata entries (one per line of a text file) as plain
   substrings, all at once with an Aho-Corasick automaton (pyahocorasick);
2. pass 1 counts, for each entry, the pairs whose caption contains it;
3. pass 2 draws, for each entry a pair matches, "keep" with probability p = min(1, t / count) and
   keeps the pair if any draw says yes. An entry with count <= t (the tail) keeps all its pairs;
   a head entry keeps about t. Pairs that match no entry are removed (MetaCLIP's choice) unless
   `keep_unmatched`.

Memory does not grow with the table: both passes read it in chunks (`chunks.iter_chunks`) and the
only state is one counter per entry. The draw for (pair, entry) is a hash of (seed, the pair's row
number in the whole table, the entry's number), not a stream of random numbers, so it does not
depend on the chunk size and the same code can run over a table split between machines (add the
pass-1 counts up, then run pass 2 on each part with its row offset).

Output folder: `kept.parquet` (the input's columns), `removed.parquet` (the input's columns plus
`reason`: `no_entry_match`, `missing_caption`, `balanced_out`), `entry_counts.parquet` (entry,
count_before, count_after) and `stats.json`, whose numbers are checked to add up.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ahocorasick
import numpy as np
import pandas as pd
import pyarrow as pa

from data_prep.curate.chunks import ChunkWriter, iter_chunks, peek
from data_prep.tables import InputTableError, input_files

OUTPUT_FILES = ("kept.parquet", "removed.parquet", "entry_counts.parquet", "stats.json")
REMOVAL_REASONS = ("missing_caption", "no_entry_match", "balanced_out")


@dataclass(frozen=True)
class BalanceOptions:
    threshold: int = 20_000  # MetaCLIP's t for a 400 M-pair set; scale it with the table
    seed: int = 0
    chunk_rows: int = 100_000
    caption_col: str = "caption"
    keep_unmatched: bool = False
    ignore_case: bool = False  # MetaCLIP matches case-sensitively; True lower-cases entries and captions


def read_entries(path: str | Path, ignore_case: bool = False) -> tuple[list[str], dict]:
    """(entries in file order, duplicates and blank lines skipped) from a text file of one entry per line."""
    path = Path(path)
    if not path.is_file():
        raise InputTableError(f"{path}: no such metadata file; give a text file with one entry per line")
    entries, seen, blank, duplicate = [], set(), 0, 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            entry = line.rstrip("\r\n")
            entry = entry.lower() if ignore_case else entry
            if not entry.strip():
                blank += 1
            elif entry in seen:
                duplicate += 1
            else:
                seen.add(entry)
                entries.append(entry)
    if not entries:
        raise InputTableError(f"{path}: the metadata file holds no entries; write one entry per line")
    return entries, {
        "path": str(path),
        "entries": len(entries),
        "blank_lines_skipped": blank,
        "duplicates_skipped": duplicate,
    }


def build_matcher(entries: list[str]) -> ahocorasick.Automaton:
    automaton = ahocorasick.Automaton()
    for index, entry in enumerate(entries):
        automaton.add_word(entry, index)
    automaton.make_automaton()
    return automaton


def match_chunk(
    matcher: ahocorasick.Automaton, captions: pd.Series, ignore_case: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, entry) index pairs, one per distinct entry a caption contains, and a mask of missing captions."""
    missing = captions.isna().to_numpy()
    rows, found = [], []
    for row, caption in enumerate(captions.to_numpy()):
        if missing[row]:
            continue
        text = str(caption)
        entries = {entry for _, entry in matcher.iter(text.lower() if ignore_case else text)}
        rows.extend([row] * len(entries))
        found.extend(entries)
    return np.asarray(rows, dtype=np.int64), np.asarray(found, dtype=np.int64), missing


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose output bits each depend on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_draws(seed: int, rows: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """One uniform [0, 1) number per (row, entry), a pure function of (seed, row, entry).

    numpy's generators give streams, not keyed draws; a keyed draw makes the result independent
    of how the table is cut into chunks or machines.
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        key = _mix(np.asarray([seed], dtype=np.uint64) * _GOLDEN + _GOLDEN)
        x = _mix(rows.astype(np.uint64) * _GOLDEN + key)
        x = _mix(x ^ ((entries.astype(np.uint64) + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03)))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _check_output(output: Path, overwrite: bool) -> None:
    clashes = [name for name in OUTPUT_FILES if (output / name).exists()]
    if clashes and not overwrite:
        raise FileExistsError(
            f"{output} already holds {clashes}; pass --overwrite to replace them or pick another folder"
        )


def balance(input_path: str | Path, metadata_path: str | Path, output_dir: str | Path, **options) -> dict:
    """Balance the table at `input_path` against the entries in `metadata_path`; returns the stats."""
    known = set(BalanceOptions.__dataclass_fields__)
    unknown = sorted(set(options) - known - {"overwrite"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options: {sorted(known | {'overwrite'})}")
    overwrite = options.pop("overwrite", False)
    opts = BalanceOptions(**options)
    if opts.threshold < 1:
        raise ValueError(f"threshold must be at least 1 pair per entry, got {opts.threshold}")
    if opts.chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {opts.chunk_rows}")
    output = Path(output_dir)
    _check_output(output, overwrite)
    any_rows = False
    for file in input_files(input_path):
        columns, has_rows = peek(file)
        if opts.caption_col not in columns:
            raise InputTableError(
                f"{file}: missing column {opts.caption_col!r}; it has {columns}. Rename it or pass --caption-col"
            )
        if "reason" in columns:
            raise InputTableError(
                f"{file}: has a column named 'reason', which removed.parquet uses for the removal "
                f"reason; rename it first"
            )
        any_rows |= has_rows
    if not any_rows:
        raise InputTableError(f"{input_path}: the table has a header but no rows; nothing to balance")
    entries, metadata = read_entries(metadata_path, opts.ignore_case)
    matcher = build_matcher(entries)
    output.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    before = np.zeros(len(entries), dtype=np.int64)
    rows_in = 0
    for chunk in iter_chunks(input_path, opts.chunk_rows):  # pass 1: counts per entry
        rows, found, _ = match_chunk(matcher, chunk[opts.caption_col], opts.ignore_case)
        before += np.bincount(found, minlength=len(entries))
        rows_in += len(chunk)
    keep_probability = np.minimum(1.0, opts.threshold / np.maximum(before, 1))

    after = np.zeros(len(entries), dtype=np.int64)
    removed_by_reason = dict.fromkeys(REMOVAL_REASONS, 0)
    matched_pairs = offset = 0
    kept_writer = ChunkWriter(output / "kept.parquet", {opts.caption_col: pa.string()})
    removed_writer = ChunkWriter(output / "removed.parquet", {opts.caption_col: pa.string(), "reason": pa.string()})
    with kept_writer, removed_writer:
        for chunk in iter_chunks(input_path, opts.chunk_rows):  # pass 2: draws
            rows, found, missing = match_chunk(matcher, chunk[opts.caption_col], opts.ignore_case)
            hits = uniform_draws(opts.seed, rows + offset, found) < keep_probability[found]
            kept = np.bincount(rows[hits], minlength=len(chunk)) > 0
            matched = np.bincount(rows, minlength=len(chunk)) > 0
            reason = np.full(len(chunk), "balanced_out", dtype=object)
            reason[~matched] = "no_entry_match"
            reason[missing] = "missing_caption"
            if opts.keep_unmatched:
                kept |= ~matched & ~missing
            after += np.bincount(found[kept[rows]], minlength=len(entries))
            matched_pairs += int(matched.sum())
            for name in REMOVAL_REASONS:
                removed_by_reason[name] += int((reason[~kept] == name).sum())
            kept_writer.write(chunk[kept])
            removed_writer.write(chunk[~kept].assign(reason=reason[~kept]))
            offset += len(chunk)
    seconds = time.perf_counter() - started

    pd.DataFrame({"entry": entries, "count_before": before, "count_after": after}).to_parquet(
        output / "entry_counts.parquet", index=False
    )
    stats = _stats(
        input_path,
        metadata,
        opts,
        entries,
        before,
        after,
        rows_in,
        matched_pairs,
        kept_writer.rows,
        removed_writer.rows,
        removed_by_reason,
        seconds,
    )
    (output / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _stats(
    input_path,
    metadata,
    opts,
    entries,
    before,
    after,
    rows_in,
    matched_pairs,
    kept,
    removed,
    removed_by_reason,
    seconds,
) -> dict:
    head = before > opts.threshold
    tail = (before > 0) & ~head
    top = np.argsort(-before, kind="stable")[:20]
    stats = {
        "input": {"path": str(input_path), "rows": rows_in},
        "metadata": metadata,
        "pairs": {
            "matched": matched_pairs,
            "no_entry_match": rows_in - matched_pairs - removed_by_reason["missing_caption"],
            "missing_caption": removed_by_reason["missing_caption"],
            "kept": kept,
            "removed": removed,
        },
        "removed_by_reason": removed_by_reason,
        "entries_matched": int((before > 0).sum()),
        # matches = (pair, entry) incidences; a pair matching two entries counts under both
        "head": {
            "entries": int(head.sum()),
            "matches_before": int(before[head].sum()),
            "matches_after": int(after[head].sum()),
            "matches_after_expected_single_match": int(np.minimum(before[head], opts.threshold).sum()),
        },
        "tail": {
            "entries": int(tail.sum()),
            "matches_before": int(before[tail].sum()),
            "matches_after": int(after[tail].sum()),
        },
        "top_entries": [
            {"entry": entries[i], "before": int(before[i]), "after": int(after[i])} for i in top if before[i] > 0
        ],
        "this_run": {
            "seconds": round(seconds, 3),
            "rows_per_second": round(rows_in / seconds, 1) if seconds else None,
            "passes_over_the_table": 2,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "settings": asdict(opts),
        "outputs": list(OUTPUT_FILES),
    }
    _check_accounting(stats)
    return stats


def _check_accounting(stats: dict) -> None:
    """Raise if any row is unaccounted for: silent loss is a bug, not a statistic."""
    p, reasons = stats["pairs"], stats["removed_by_reason"]
    if p["kept"] + p["removed"] != stats["input"]["rows"]:
        raise AssertionError(f"kept + removed != rows in: {p}, rows {stats['input']['rows']}")
    if sum(reasons.values()) != p["removed"]:
        raise AssertionError(f"removal reasons do not add up: {reasons} vs {p['removed']}")
    if p["matched"] + p["no_entry_match"] + p["missing_caption"] != stats["input"]["rows"]:
        raise AssertionError(f"matched + unmatched + missing != rows in: {p}")
    if stats["tail"]["matches_after"] != stats["tail"]["matches_before"]:
        raise AssertionError(f"a tail entry (count <= t) lost pairs, but its keep probability is 1: {stats['tail']}")
