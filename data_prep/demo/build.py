"""Build the demo corpus end to end: digits -> local faulty web server -> img2dataset -> shards.

    python -m data_prep.demo --out demo_data [--image-size 64 --copies 2 --fault-share 0.1 --seed 0]

Layout written under --out (the training demo and the evaluation rely on it):
    shards/{00000..}.tar, shards/sizes.json, shards/stats.json   training samples (via real HTTP)
    urls.parquet                                                 url, caption, label (what was downloaded)
    injected_faults.parquet                                      url -> injected fault, per URL
    test/<k>/<id>.png, test/classnames.txt, test/templates.txt   held-out split as an ImageFolder
    test_wds/00000.tar                                           the same split: .png, .cls, .txt
    manifest.json                                                paths, counts, faults injected vs counted
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds

from data_prep import download as downloader
from data_prep.demo import digits, server
from data_prep.failures import reason_of

# Which reason data_prep must count each injected fault under (the demo and tests check this).
EXPECTED_REASON = {
    server.NOT_FOUND: "http_404",
    server.SERVER_ERROR: "http_500",
    server.SLOW: "timeout",
    server.TRUNCATED: "truncated_transfer",
    server.HTML_AS_IMAGE: "not_an_image",
    server.OPTED_OUT: "opted_out",
}
EMPTY_CAPTION = "empty_caption"  # a fault in the table itself, caught by hygiene before download


def assign_faults(n_urls: int, fault_share: float, rng: np.random.Generator) -> list[str]:
    """A fault (or 'healthy') per URL: round(share * n) faulty, split evenly across the fault types."""
    if not 0 <= fault_share < 1:
        raise ValueError(f"fault_share must be in [0, 1), got {fault_share}")
    n_faulty = round(fault_share * n_urls)
    faults = [server.HEALTHY] * n_urls
    for slot, idx in enumerate(rng.permutation(n_urls)[:n_faulty]):
        faults[idx] = server.FAULTS[slot % len(server.FAULTS)]
    return faults


def _write_test_split(out: Path, images, labels, ids, served_size: int) -> dict:
    test_dir, wds_dir = out / "test", out / "test_wds"
    for k in range(10):
        (test_dir / str(k)).mkdir(parents=True, exist_ok=True)
    wds_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with wds.TarWriter(str(wds_dir / "00000.tar")) as sink:
        for image, label, idx in zip(images, labels, ids):
            png = digits.png_bytes(digits.upscale(image, served_size))
            (test_dir / str(label) / f"{idx:05d}.png").write_bytes(png)
            caption = digits.caption_for(int(label), rng)
            sink.write({"__key__": f"{idx:05d}", "png": png, "cls": str(int(label)).encode(), "txt": caption})
    (test_dir / "classnames.txt").write_text("\n".join(digits.CLASS_NAMES) + "\n")
    (test_dir / "templates.txt").write_text("\n".join(digits.ZERO_SHOT_TEMPLATES) + "\n")
    return {"images": int(len(ids)), "per_class": {str(k): int(v) for k, v in sorted(Counter(labels).items())}}


def _url_table(train_ids, labels, copies, fault_share, caption_noise, seed):
    """Rows (path, caption, label, fault), shuffled so faults and digits spread over all shards."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    rows = [(f"/img/{i:05d}-{c}.png", int(labels[i])) for i in train_ids for c in range(copies)]
    order = np_rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    faults = assign_faults(len(rows), fault_share, np_rng)
    captions = []
    for (_path, label), _fault in zip(rows, faults):
        caption = digits.caption_for(label, rng)
        captions.append(digits.add_noise(caption, rng) if rng.random() < caption_noise else caption)
    table = pd.DataFrame(
        {"path": [p for p, _ in rows], "caption": captions, "label": [lab for _, lab in rows], "fault": faults}
    )
    # A handful of rows with blank alt-text: hygiene must drop and count them, never request them.
    n_empty = max(1, len(table) // 500) if fault_share > 0 else 0
    blank = table.index[table["fault"] == server.HEALTHY][:n_empty]
    table.loc[blank, "caption"] = "   "
    table.loc[blank, "fault"] = EMPTY_CAPTION
    return table


def faults_injected_vs_counted(table: pd.DataFrame, shards_dir: Path, stats: dict) -> dict:
    """Per fault type: URLs injected, URLs counted under the expected reason, reasons actually seen."""
    from data_prep import shards  # noqa: PLC0415

    results = shards.shard_results(shards_dir, shards.completed_shards(shards_dir))
    seen = results.set_index("url")
    report = {}
    for fault, group in table.groupby("fault"):
        urls = group["url"]
        if fault == EMPTY_CAPTION:
            dropped = pd.read_parquet(shards_dir / downloader.PREP_DIR / "dropped.parquet")
            hits = dropped[dropped["url"].isin(urls)]["drop_reason"]
            report[fault] = {
                "injected": len(urls),
                "expected": "empty_caption",
                "counted": int((hits == "empty_caption").sum()),
                "seen": dict(Counter(hits)),
            }
            continue
        rows = seen.loc[seen.index.intersection(urls)]
        outcome = [
            ("success" if s == "success" else reason_of(m)) for s, m in zip(rows["status"], rows["error_message"])
        ]
        expected = "success" if fault == server.HEALTHY else EXPECTED_REASON[fault]
        report[fault] = {
            "injected": len(urls),
            "expected": expected,
            "counted": sum(o == expected for o in outcome),
            "seen": dict(Counter(outcome)),
        }
    return report


def build_demo_corpus(
    out_dir,
    image_size: int = 64,
    copies: int = 2,
    fault_share: float = 0.1,
    seed: int = 0,
    served_size: int = 96,
    test_share: float = 0.2,
    caption_noise: float = 0.05,
    num_shards: int = 8,
    processes: int | None = None,
    threads: int = 32,
    timeout: float = 2.0,
    slow_seconds: float = 4.0,
    max_images: int | None = None,
    verbose: bool = True,
) -> dict:
    """Build the whole demo corpus under out_dir (rebuilt from scratch); returns the manifest dict."""
    # 8 shards: divisible by the ranks x workers of the demo (2 x 2), and few enough that no img2dataset
    # process handles more than 5 and gets respawned (maxtasksperchild=5; a respawn re-imports torch).
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if slow_seconds <= timeout:
        raise ValueError(f"slow_seconds ({slow_seconds}) must exceed the download timeout ({timeout})")
    started = time.perf_counter()
    out = Path(out_dir).absolute()
    for part in ("shards", "test", "test_wds"):
        shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    images, labels = digits.load_digits_arrays()
    if max_images is not None:  # a smaller corpus, for tests
        images, labels = images[:max_images], labels[:max_images]
    train_ids, test_ids = digits.stratified_split(labels, test_share, seed)
    test_info = _write_test_split(out, images[test_ids], labels[test_ids], test_ids, served_size)

    table = _url_table(train_ids, labels, copies, fault_share, caption_noise, seed)
    served = {i: digits.png_bytes(digits.upscale(images[i], served_size)) for i in train_ids}
    routes = {
        path: server.Route(served[int(path[5:10])], "image/png", fault if fault in server.FAULTS else server.HEALTHY)
        for path, fault in zip(table["path"], table["fault"])
    }
    with server.FaultyImageServer(routes, slow_seconds=slow_seconds) as web:
        table["url"] = table["path"].map(web.url_for)
        table[["url", "caption", "label"]].to_parquet(out / "urls.parquet", index=False)
        table[["url", "fault"]].to_parquet(out / "injected_faults.parquet", index=False)
        stats = downloader.download(
            out / "urls.parquet",
            out / "shards",
            image_size=image_size,
            resize_mode="border",
            encode_format="jpg",
            processes=processes,
            threads=threads,
            shard_size=math.ceil(len(table) / num_shards),
            timeout=timeout,
            retries=0,
            verbose=verbose,
        )
        requests = web.requests_total

    faults = faults_injected_vs_counted(table, out / "shards", stats)
    manifest = {
        "paths": {
            "shards": str(out / "shards"),
            "sizes": str(out / "shards" / "sizes.json"),
            "stats": str(out / "shards" / "stats.json"),
            "urls": str(out / "urls.parquet"),
            "injected_faults": str(out / "injected_faults.parquet"),
            "test": str(out / "test"),
            "classnames": str(out / "test" / "classnames.txt"),
            "templates": str(out / "test" / "templates.txt"),
            "test_wds": str(out / "test_wds" / "00000.tar"),
        },
        "counts": {
            "source_images": int(len(labels)),
            "train_images": int(len(train_ids)),
            "urls": int(len(table)),
            "train_samples": int(stats["samples_in_shards"]),
            "shards": int(stats["shards"]["complete"]),
            "test": test_info,
            "http_requests": int(requests),
        },
        "faults": faults,
        "settings": {
            "image_size": image_size,
            "served_size": served_size,
            "copies": copies,
            "fault_share": fault_share,
            "seed": seed,
            "num_shards": num_shards,
            "timeout": timeout,
            "slow_seconds": slow_seconds,
        },
        "seconds": round(time.perf_counter() - started, 2),
        "stats": stats,
    }
    (out / "manifest.json").write_text(json.dumps(downloader._json_safe(manifest), indent=2) + "\n")
    if verbose:
        print(format_fault_table(faults))
        print(f"demo corpus ready in {manifest['seconds']:.1f} s: {out}")
    return manifest


def format_fault_table(faults: dict) -> str:
    lines = [f"{'injected':<15}{'URLs':>6}{'counted':>9}  as"]
    for fault, row in faults.items():
        flag = "" if row["counted"] == row["injected"] else f"   MISMATCH, seen {row['seen']}"
        lines.append(f"{fault:<15}{row['injected']:>6}{row['counted']:>9}  {row['expected']}{flag}")
    return "\n".join(lines)
