"""What data_prep.download costs on top of plain img2dataset, measured side by side in one run.

    python -m data_prep.benchmark [--urls 2000 --shards 4 --repeats 2 --with-spark]

Both download the same URL table from the same local server (healthy digits images) with the
same img2dataset settings; data_prep adds table checks, caption hygiene, URL fingerprinting,
tar re-reading for sizes.json and stats. Reported as a ratio (data_prep / img2dataset wall time,
best of `repeats`, runs interleaved), never as an absolute goal. `--with-spark` adds data_prep with
`distributor="pyspark"` (img2dataset's Spark distributor, local[processes], JVM start included).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from data_prep.demo import digits
from data_prep.demo.server import FaultyImageServer, Route
from data_prep.download import download

SETTINGS = dict(image_size=64, resize_mode="border", encode_format="jpg", timeout=5)


def _plain_img2dataset(table: Path, out: Path, shard_size: int, processes: int):
    import img2dataset  # noqa: PLC0415

    img2dataset.download(
        url_list=str(table),
        output_folder=str(out),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        image_size=SETTINGS["image_size"],
        resize_mode=SETTINGS["resize_mode"],
        encode_format=SETTINGS["encode_format"],
        timeout=SETTINGS["timeout"],
        processes_count=processes,
        thread_count=32,
        number_sample_per_shard=shard_size,
    )


def run(n_urls: int, n_shards: int, repeats: int, processes: int, with_spark: bool = False) -> dict:
    images, labels = digits.load_digits_arrays()
    pngs = [digits.png_bytes(digits.upscale(img, 96)) for img in images]
    routes = {f"/{i}.png": Route(pngs[i % len(pngs)], "image/png") for i in range(n_urls)}
    shard_size = math.ceil(n_urls / n_shards)
    times: dict[str, list[float]] = {
        "img2dataset": [],
        "data_prep": [],
        **({"data_prep_pyspark": []} if with_spark else {}),
    }
    with tempfile.TemporaryDirectory() as tmp, FaultyImageServer(routes) as web:
        tmp = Path(tmp)
        table = pd.DataFrame(
            {
                "url": [web.url_for(p) for p in routes],
                "caption": [f"a scan of a handwritten {labels[i % len(labels)]}" for i in range(n_urls)],
            }
        )
        table.to_parquet(tmp / "urls.parquet")
        for r in range(repeats):
            for name in times:
                out = tmp / f"{name}-{r}"
                started = time.perf_counter()
                if name == "img2dataset":
                    _plain_img2dataset(tmp / "urls.parquet", out, shard_size, processes)
                else:
                    distributor = "pyspark" if name == "data_prep_pyspark" else "multiprocessing"
                    download(
                        tmp / "urls.parquet",
                        out,
                        shard_size=shard_size,
                        processes=processes,
                        threads=32,
                        verbose=False,
                        distributor=distributor,
                        **SETTINGS,
                    )
                times[name].append(time.perf_counter() - started)
                shutil.rmtree(out)
    best = {k: min(v) for k, v in times.items()}
    return {
        "urls": n_urls,
        "shards": n_shards,
        "processes": processes,
        "repeats": repeats,
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "urls_per_second_best": {k: round(n_urls / v, 1) for k, v in best.items()},
        "overhead_ratio": round(best["data_prep"] / best["img2dataset"], 3),
        **(
            {"pyspark_vs_multiprocessing_ratio": round(best["data_prep_pyspark"] / best["data_prep"], 3)}
            if with_spark
            else {}
        ),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.benchmark")
    p.add_argument("--urls", type=int, default=2000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--with-spark", action="store_true", help="also data_prep with --distributor pyspark")
    args = p.parse_args(argv)
    print(json.dumps(run(args.urls, args.shards, args.repeats, args.processes, args.with_spark), indent=2))


if __name__ == "__main__":
    main()
