"""Curation throughput (`data_prep.curate`), each against a reference measured in the same run.

    python -m benchmarks.curate_bench                     # 200k-row balancing, 3.6k-image scoring
    python -m benchmarks.curate_bench --rows 20000 --entries 5000 --model local-dir:exported/ --json out.json

Balancing: `balance()` (Aho-Corasick, both passes, reading and writing parquet) over a synthetic
table whose captions are 12 words drawn from a Zipf law over a vocabulary, with `--entries` of those
words as metadata; reference: the plain Python substring loop (`entry in caption` for every entry),
timed on a sample of the same captions. balance() runs in one process on one core: rows/s is per core.
Scoring: `score_shards` (decode + preprocess + both towers, batched) on shards of the demo digits with
the digits CLIP of tests/support/digits_clip.py (trained here in ~35 s unless --model is given);
reference: decode + preprocess alone over the same samples, the part no model speeds up.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from data_prep.curate.balance import balance
from data_prep.curate.score import load_model, score_shards
from data_prep.curate.shardio import image_of, iter_samples


def _vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(rng.choice(letters, rng.integers(4, 10))) for _ in range(size * 2)}
    return sorted(words)[:size]


def bench_balance(work: Path, rows: int, entries: int, reference_rows: int) -> dict:
    rng = np.random.default_rng(0)
    vocab = _vocabulary(entries * 4, rng)
    picks = np.minimum(rng.zipf(1.2, (rows, 12)), len(vocab)) - 1
    captions = [" ".join(vocab[i] for i in row) for row in picks]
    table = work / "table.parquet"
    frame = pd.DataFrame({"url": [f"http://example.com/{i}.jpg" for i in range(rows)], "caption": captions})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), table, row_group_size=50_000)
    metadata = work / "entries.txt"
    metadata.write_text("\n".join(vocab[:entries]) + "\n")

    started = time.perf_counter()
    stats = balance(table, metadata, work / "balanced", threshold=max(1, rows // 100), chunk_rows=50_000)
    seconds = time.perf_counter() - started

    entry_list = vocab[:entries]
    sample = captions[:reference_rows]
    ref_started = time.perf_counter()
    for caption in sample:
        [e for e in entry_list if e in caption]  # noqa: B018 - MetaCLIP's plain substring loop: the cost is the point
    ref_seconds = time.perf_counter() - ref_started
    return {
        "rows": rows,
        "entries": entries,
        "seconds": round(seconds, 2),
        "rows_per_second_per_core": round(rows / seconds),
        "kept": stats["pairs"]["kept"],
        "reference_rows": len(sample),
        "reference_rows_per_second": round(len(sample) / ref_seconds, 1),
        "ratio": round((rows / seconds) / (len(sample) / ref_seconds), 1),
    }


def bench_score(work: Path, model: str | None, copies: int, batch_size: int, device: str | None) -> dict:
    from tests.support.digits_clip import train_digits_clip, write_mismatched_corpus  # noqa: PLC0415 - imports clip_pl

    if model is None:
        model = train_digits_clip(work / "model")
    shards = work / "shards"
    write_mismatched_corpus(shards, copies=copies, shards=4)
    info = score_shards(shards, model, batch_size=batch_size, device=device)

    _, preprocess, _, _ = load_model(model, device="cpu")
    started, decoded = time.perf_counter(), 0
    for tar in sorted(shards.glob("*.tar")):
        for _, files in iter_samples(tar):
            try:
                preprocess(Image.open(io.BytesIO(image_of(files))).convert("RGB"))
                decoded += 1
            except Exception:  # noqa: BLE001,S112 - the one planted broken image
                continue
    decode_rate = decoded / (time.perf_counter() - started)
    rate = info["this_run"]["images_per_second"]
    return {
        "images": info["this_run"]["scored"],
        "device": info["device"],
        "batch_size": batch_size,
        "images_per_second": rate,
        "decode_preprocess_only_per_second": round(decode_rate, 1),
        "ratio_to_decode_only": round(rate / decode_rate, 2),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--reference-rows", type=int, default=300)
    parser.add_argument("--model", default=None, help="open_clip model to score with (default: train the digits CLIP)")
    parser.add_argument("--copies", type=int, default=10, help="times each of the 360 held-out digits is served")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "b").mkdir()
        (work / "s").mkdir()
        result = {
            "balance": bench_balance(work / "b", args.rows, args.entries, args.reference_rows),
            "score": bench_score(work / "s", args.model, args.copies, args.batch_size, args.device),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
