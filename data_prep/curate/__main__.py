"""Curation commands: table in, table out, every removal counted and kept.

    python -m data_prep.curate balance --input urls.parquet --metadata entries.txt --output curated/
        [--threshold 20000 --seed 0 --chunk-rows 100000 --caption-col caption --keep-unmatched
         --ignore-case --overwrite]

Exit status: 0 done, 2 bad input or options.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.curate import balance
from data_prep.tables import InputTableError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.curate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bal = commands.add_parser("balance", help="MetaCLIP/WIT-style balancing against metadata entries")
    bal.add_argument("--input", required=True, help="url/caption table (parquet, csv, tsv, jsonl) or a folder of one format")
    bal.add_argument("--metadata", required=True, help="text file, one metadata entry per line")
    bal.add_argument("--output", required=True, help="folder for kept.parquet, removed.parquet, entry_counts.parquet, stats.json")
    bal.add_argument("--threshold", type=int, default=balance.BalanceOptions.threshold,
                     help="t: an entry matched by more than t pairs keeps about t of them (MetaCLIP: 20000 at 400 M)")
    bal.add_argument("--seed", type=int, default=0)
    bal.add_argument("--chunk-rows", type=int, default=balance.BalanceOptions.chunk_rows,
                     help="rows read at a time; memory grows with this, not with the table")
    bal.add_argument("--caption-col", default="caption")
    bal.add_argument("--keep-unmatched", action="store_true", help="keep pairs that match no entry (MetaCLIP drops them)")
    bal.add_argument("--ignore-case", action="store_true", help="lower-case entries and captions before matching")
    bal.add_argument("--overwrite", action="store_true", help="replace the output files of an earlier run")
    return parser


def summary(stats: dict) -> str:
    p, head, tail = stats["pairs"], stats["head"], stats["tail"]
    lines = [
        f"{'input rows':<24}{stats['input']['rows']}",
        f"{'entries matched':<24}{stats['entries_matched']} of {stats['metadata']['entries']}",
        f"{'head entries (> t)':<24}{head['entries']}: {head['matches_before']} -> {head['matches_after']} matches",
        f"{'tail entries (<= t)':<24}{tail['entries']}: {tail['matches_before']} -> {tail['matches_after']} matches",
        f"{'kept':<24}{p['kept']}",
        f"{'removed':<24}{p['removed']}  "
        + ", ".join(f"{k}={v}" for k, v in stats["removed_by_reason"].items() if v),
        f"{'this run':<24}{stats['this_run']['seconds']:.1f} s ({stats['this_run']['rows_per_second']} rows/s)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command == "balance":
            stats = balance.balance(args.pop("input"), args.pop("metadata"), args.pop("output"), **args)
            print(summary(stats))
    except (InputTableError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
