"""Curation commands: table in, table out, every removal counted and kept.

    python -m data_prep.curate balance --input urls.parquet --metadata entries.txt --output curated/
        [--threshold 20000 --seed 0 --chunk-rows 100000 --caption-col caption --keep-unmatched
         --ignore-case --overwrite]

    python -m data_prep.curate score --shards shards/ --model local-dir:exported/ [--pretrained W.bin
        --scores shards/_scores --batch-size 256 --device cuda]
    python -m data_prep.curate filter --shards shards/ --output cut/ (--keep-fraction 0.7 | --min-score 0.25)
        [--scores shards/_scores --overwrite]
    python -m data_prep.curate dedup --shards shards/ --output deduped/ [--threshold 0.95 --eval-images eval/
        --scores shards/_scores --device cuda --overwrite]

Exit status: 0 done, 2 bad input or options.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_prep.curate import balance, cut, dedup, score
from data_prep.tables import InputTableError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.curate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bal = commands.add_parser("balance", help="MetaCLIP/WIT-style balancing against metadata entries")
    bal.add_argument(
        "--input", required=True, help="url/caption table (parquet, csv, tsv, jsonl) or a folder of one format"
    )
    bal.add_argument("--metadata", required=True, help="text file, one metadata entry per line")
    bal.add_argument(
        "--output", required=True, help="folder for kept.parquet, removed.parquet, entry_counts.parquet, stats.json"
    )
    bal.add_argument(
        "--threshold",
        type=int,
        default=balance.BalanceOptions.threshold,
        help="t: an entry matched by more than t pairs keeps about t of them (MetaCLIP: 20000 at 400 M)",
    )
    bal.add_argument("--seed", type=int, default=0)
    bal.add_argument(
        "--chunk-rows",
        type=int,
        default=balance.BalanceOptions.chunk_rows,
        help="rows read at a time; memory grows with this, not with the table",
    )
    bal.add_argument("--caption-col", default="caption")
    bal.add_argument(
        "--keep-unmatched", action="store_true", help="keep pairs that match no entry (MetaCLIP drops them)"
    )
    bal.add_argument("--ignore-case", action="store_true", help="lower-case entries and captions before matching")
    bal.add_argument("--overwrite", action="store_true", help="replace the output files of an earlier run")

    sco = commands.add_parser("score", help="CLIP score of every pair in the shards, written beside them")
    sco.add_argument("--shards", required=True, help="folder of .tar shards (data_prep.download's output)")
    sco.add_argument(
        "--model",
        required=True,
        help="open_clip model: local-dir:FOLDER (python -m clip_pl.interchange export) or an architecture name",
    )
    sco.add_argument("--pretrained", default=None, help="weights file for a named architecture")
    sco.add_argument(
        "--scores", default=None, help=f"where the per-shard scores go (default SHARDS/{score.SCORES_DIR})"
    )
    sco.add_argument("--batch-size", type=int, default=256)
    sco.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")

    cut_cmd = commands.add_parser("filter", help="keep the best-scored pairs (a fraction or a threshold)")
    cut_cmd.add_argument("--shards", required=True)
    cut_cmd.add_argument(
        "--output", required=True, help="folder for the kept shards, sizes.json, removed.parquet, stats.json"
    )
    which = cut_cmd.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--keep-fraction", type=float, default=None, help="keep this share of the scored pairs (DataComp: 0.3)"
    )
    which.add_argument("--min-score", type=float, default=None, help="keep pairs scoring at least this")
    cut_cmd.add_argument("--scores", default=None)
    cut_cmd.add_argument("--overwrite", action="store_true")

    dup = commands.add_parser("dedup", help="remove near-duplicate images, within the shards and of an evaluation set")
    dup.add_argument("--shards", required=True)
    dup.add_argument(
        "--output", required=True, help="folder for the kept shards, sizes.json, removed.parquet, stats.json"
    )
    dup.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="cosine of the image embeddings at or above which two images are duplicates (depends on the model)",
    )
    dup.add_argument(
        "--eval-images", default=None, help="folder of evaluation images (files or .tar shards, recursively)"
    )
    dup.add_argument("--scores", default=None, help="where `score` wrote the embeddings (default SHARDS/_scores)")
    dup.add_argument("--device", default=None)
    dup.add_argument("--overwrite", action="store_true")
    return parser


def summary(stats: dict) -> str:
    p, head, tail = stats["pairs"], stats["head"], stats["tail"]
    lines = [
        f"{'input rows':<24}{stats['input']['rows']}",
        f"{'entries matched':<24}{stats['entries_matched']} of {stats['metadata']['entries']}",
        f"{'head entries (> t)':<24}{head['entries']}: {head['matches_before']} -> {head['matches_after']} matches",
        f"{'tail entries (<= t)':<24}{tail['entries']}: {tail['matches_before']} -> {tail['matches_after']} matches",
        f"{'kept':<24}{p['kept']}",
        f"{'removed':<24}{p['removed']}  " + ", ".join(f"{k}={v}" for k, v in stats["removed_by_reason"].items() if v),
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
        elif command == "score":
            info = score.score_shards(
                args["shards"], args["model"], args["pretrained"], args["scores"], args["batch_size"], args["device"]
            )
            print(json.dumps(info, indent=2))
        elif command == "dedup":
            stats = dedup.dedup_shards(
                args["shards"],
                args["output"],
                args["threshold"],
                args["eval_images"],
                args["scores"],
                args["device"],
                args["overwrite"],
            )
            print(json.dumps(stats, indent=2))
        else:
            stats = cut.filter_shards(
                args["shards"],
                args["output"],
                args["keep_fraction"],
                args["min_score"],
                args["scores"],
                args["overwrite"],
            )
            print(json.dumps(stats, indent=2))
    except (InputTableError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
