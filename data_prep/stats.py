"""The honest account of a download: `stats.json` and the summary printed after a run.

Every input row ends in exactly one bucket, and the buckets are checked to add up:
    rows_in = hygiene drops + attempted
    attempted = successes + failures (by reason) + (URLs in unfinished shards)
    samples in shards = successes - image-hash duplicates
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from data_prep.failures import message_group, reason_of


def download_counts(results: pd.DataFrame) -> dict:
    """Successes and failures (by reason, by status, by grouped message) over per-URL results."""
    failed = results[results["status"] != "success"]
    messages = failed["error_message"]
    return {
        "attempted": int(len(results)),
        "successes": int((results["status"] == "success").sum()),
        "failures": int(len(failed)),
        "failures_by_status": dict(Counter(failed["status"].fillna("unknown"))),
        "failures_by_reason": dict(Counter(messages.map(reason_of)).most_common()),
        "error_messages": dict(Counter(messages.map(message_group)).most_common(50)),
    }


def build_stats(
    *,
    input_path: str,
    hygiene: dict,
    columns_not_kept: dict,
    results: pd.DataFrame,
    expected_shards: list[str],
    done_shards: list[str],
    image_duplicates: int,
    sizes: dict[str, int],
    this_run: dict,
    settings: dict,
) -> dict:
    counts = download_counts(results)
    missing = sorted(set(expected_shards) - set(done_shards))
    samples = sum(sizes.values())
    stats = {
        "input": {"path": input_path, "rows": hygiene["rows_in"], "columns_not_kept": columns_not_kept},
        "hygiene": hygiene,
        "download": counts,
        "success_rate": round(counts["successes"] / counts["attempted"], 4) if counts["attempted"] else 0.0,
        "image_hash_duplicates_dropped": image_duplicates,
        "samples_in_shards": samples,
        "shards": {"complete": len(done_shards), "expected": len(expected_shards), "unfinished": missing},
        "complete": not missing,
        "this_run": this_run,
        "settings": settings,
    }
    _check_accounting(stats)
    return stats


def _check_accounting(stats: dict) -> None:
    """Raise if any row is unaccounted for: silent loss is a bug, not a statistic."""
    h, d = stats["hygiene"], stats["download"]
    if d["successes"] + d["failures"] != d["attempted"]:
        raise AssertionError(f"download counts do not add up: {d}")
    if sum(d["failures_by_reason"].values()) != d["failures"]:
        raise AssertionError(f"failure reasons do not add up: {d}")
    if stats["complete"] and d["attempted"] != h["rows_kept"]:
        raise AssertionError(f"{h['rows_kept']} rows were sent to img2dataset but {d['attempted']} were recorded")
    if stats["samples_in_shards"] != d["successes"] - stats["image_hash_duplicates_dropped"]:
        raise AssertionError(
            f"the tars hold {stats['samples_in_shards']} samples, expected "
            f"{d['successes']} successes - {stats['image_hash_duplicates_dropped']} duplicates"
        )


def format_summary(stats: dict) -> str:
    h, d, run = stats["hygiene"], stats["download"], stats["this_run"]

    def row(label, value):
        return f"{label:<24}{value}"

    drops = ", ".join(f"{k}={v}" for k, v in h["dropped_by_reason"].items() if v)
    lines = [
        row("input rows", h["rows_in"]),
        row("dropped (hygiene)", f"{h['rows_in'] - h['rows_kept']}  {drops}".rstrip()),
        row("attempted", d["attempted"]),
        row("successes", f"{d['successes']}  ({100 * stats['success_rate']:.1f} %)"),
        row("failures", d["failures"]),
    ]
    lines += [row(f"  {reason}", n) for reason, n in d["failures_by_reason"].items()]
    if stats["image_hash_duplicates_dropped"]:
        lines.append(row("image duplicates", f"{stats['image_hash_duplicates_dropped']} dropped"))
    lines.append(row("samples in shards", f"{stats['samples_in_shards']} in {stats['shards']['complete']} shard(s)"))
    lines.append(
        row(
            "this run", f"{run['urls_downloaded']} URLs in {run['seconds']:.1f} s ({run['urls_per_second']:.1f} URLs/s)"
        )
    )
    if not stats["complete"]:
        lines.append(
            f"INCOMPLETE: shard(s) {stats['shards']['unfinished']} did not finish; run the same command again to resume"
        )
    return "\n".join(lines)
