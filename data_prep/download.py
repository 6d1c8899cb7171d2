"""Turn a url/caption table into WebDataset shards with img2dataset, and account for every row.

    python -m data_prep.download --input urls.parquet --output shards/ [--image-size 224
        --resize-mode keep_ratio --processes 8 --threads 64 --shard-size 10000 --timeout 10
        --retries 1 --user-agent-token mybot --dedup-url --dedup-image-hash --min-caption-chars 2
        --wandb --distributor pyspark]
    clip-pl-download ...   (the same, installed as a console script)

or from Python: `data_prep.download.download("urls.parquet", "shards/", image_size=224)` -> stats.

The output folder holds `00000.tar …` (samples: .jpg image, .txt caption, .json metadata incl. the
kept extra columns), `sizes.json` (shard -> samples, OpenCLIP's format, used for epoch size) and
`stats.json` (see data_prep/stats.py). Running the same command again resumes: finished shards
are kept and only unfinished ones are downloaded. Exit status: 0 done, 1 shards unfinished,
2 bad input or options, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_prep import captions, shards, stats, tables

RESIZE_MODES = ("border", "keep_ratio", "center_crop", "no", "keep_ratio_largest")
ENCODE_FORMATS = ("jpg", "png", "webp")
DEFAULT_OPTOUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
DISTRIBUTORS = ("multiprocessing", "pyspark")  # img2dataset's own; pyspark: local[processes] or the active session
PREP_DIR = "_prep"  # our own bookkeeping; a sub-folder, because img2dataset parses every top-level *.json


@dataclass
class DownloadOptions:
    url_col: str = "url"
    caption_col: str = "caption"
    # keep_ratio: shorter side to image_size, aspect kept, so training crops see the whole picture
    image_size: int = 224
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    processes: int | None = None  # None: the CPUs this process may use (capped by the shard count)
    threads: int | None = None  # None: 64 per process; downloads wait on the network, not the CPU
    shard_size: int = 10_000
    timeout: float = 10
    retries: int = 0
    user_agent_token: str | None = None
    respect_optouts: bool = True
    optout_directives: tuple[str, ...] = DEFAULT_OPTOUT_DIRECTIVES
    min_caption_chars: int = 2
    dedup_url: bool = False
    dedup_image_hash: bool = False
    keep_columns: list[str] | None = None  # None: every extra column img2dataset can carry
    overwrite: bool = False
    wandb: bool = False
    wandb_project: str = "clip_pl-data"
    distributor: str = "multiprocessing"
    verbose: bool = True

    def validate(self) -> None:
        problems = []
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.encode_format not in ENCODE_FORMATS:
            problems.append(f"encode_format {self.encode_format!r} is not one of {ENCODE_FORMATS}")
        for name in ("image_size", "shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("processes", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (or left unset to size it from the machine)")
        if self.timeout <= 0:
            problems.append("timeout must be > 0 seconds")
        if self.retries < 0 or self.min_caption_chars < 0:
            problems.append("retries and min_caption_chars must be >= 0")
        if self.distributor not in DISTRIBUTORS:
            problems.append(f"distributor {self.distributor!r} is not one of {DISTRIBUTORS}")
        if problems:
            raise ValueError("bad download options: " + "; ".join(problems))
        if self.distributor == "pyspark":
            _check_spark_available()


def _check_spark_available() -> None:
    """pyspark needs the package and a Java runtime; say so before any work, not from deep inside Spark."""
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("pyspark") is None:
        raise ValueError("--distributor pyspark needs pyspark: pip install 'pyspark>=3.5'")
    if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
        raise ValueError("--distributor pyspark needs a Java runtime (JRE 17) on PATH or JAVA_HOME")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parallelism(opts: DownloadOptions, shards_to_do: int) -> tuple[int, int]:
    # Each img2dataset process takes whole shards, so processes beyond the shard count only cost a spawn.
    processes = opts.processes or usable_cpus()
    processes = max(1, min(processes, max(shards_to_do, 1)))
    return processes, opts.threads or 64


# Settings every shard of one output folder must share; the rest (timeout, threads…) may change on resume.
_SHARED_SETTINGS = (
    "shard_size",
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "encode_format",
    "encode_quality",
    "min_image_size",
    "max_aspect_ratio",
    "respect_optouts",
    "optout_directives",
    "user_agent_token",
)


def _fingerprint(kept: pd.DataFrame, extras: list[str], opts: DownloadOptions) -> str:
    """What a resumed run must share with the first: the rows, their shard split, the sample settings."""
    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(kept[[opts.url_col, opts.caption_col]], index=True).values.tobytes())
    digest.update(f"extras={extras};".encode())
    for name in _SHARED_SETTINGS:
        digest.update(f"{name}={getattr(opts, name)};".encode())
    return digest.hexdigest()


def _prepare_output(output_dir: Path, fingerprint: str, overwrite: bool) -> None:
    prep = output_dir / PREP_DIR
    if output_dir.exists() and any(output_dir.iterdir()):
        if not prep.is_dir():
            raise FileExistsError(
                f"{output_dir} is not empty and was not made by data_prep.download; "
                "choose an empty or new output folder"
            )
        if overwrite:
            shutil.rmtree(output_dir)
        else:
            previous = (prep / "fingerprint.txt").read_text().strip() if (prep / "fingerprint.txt").exists() else ""
            if previous != fingerprint:
                raise FileExistsError(
                    f"{output_dir} holds a download of a different table or different sample settings "
                    f"({', '.join(_SHARED_SETTINGS)}, kept columns); "
                    "resuming would mix them. Pass --overwrite to start again, or choose a new output folder"
                )
    (output_dir / PREP_DIR).mkdir(parents=True, exist_ok=True)
    (output_dir / PREP_DIR / "fingerprint.txt").write_text(fingerprint + "\n")
    # Derived files go before img2dataset runs: it reads every top-level *.json as "<shard>_stats.json".
    for derived in ("sizes.json", "stats.json"):
        (output_dir / derived).unlink(missing_ok=True)


def _run_img2dataset(table_path: Path, output_dir: Path, opts: DownloadOptions, extras, processes, threads):
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
    if opts.distributor == "pyspark":
        # Spark's Python workers must run this interpreter (its img2dataset), not whatever `python3` is on PATH
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import img2dataset  # noqa: PLC0415 - heavy (cv2, albumentations); only needed here

    try:
        _img2dataset_download(img2dataset, table_path, output_dir, opts, extras, processes, threads)
    except SystemExit as stop:
        # img2dataset's SIGINT handler ends with sys.exit(0): without this, Ctrl-C would look like success.
        raise KeyboardInterrupt(
            f"img2dataset was interrupted (exit {stop.code}); finished shards are kept: "
            "run the same command again to resume"
        ) from None


def _img2dataset_download(img2dataset, table_path, output_dir, opts, extras, processes, threads):
    img2dataset.download(
        url_list=str(table_path),
        output_folder=str(output_dir),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        image_size=opts.image_size,
        resize_mode=opts.resize_mode,
        resize_only_if_bigger=opts.resize_only_if_bigger,
        encode_format=opts.encode_format,
        encode_quality=opts.encode_quality,
        min_image_size=opts.min_image_size,
        max_aspect_ratio=opts.max_aspect_ratio,
        processes_count=processes,
        thread_count=threads,
        number_sample_per_shard=opts.shard_size,
        timeout=opts.timeout,
        retries=opts.retries,
        save_additional_columns=extras or None,
        compute_hash="sha256",
        # "incremental" keeps finished shards. Never "overwrite": img2dataset 1.47 then deletes its
        # own _tmp folder after creating it and hangs retrying; --overwrite is handled above instead.
        incremental_mode="incremental",
        user_agent_token=opts.user_agent_token,
        # An empty list is img2dataset's "check nothing"; None would mean its default list.
        disallowed_header_directives=list(opts.optout_directives) if opts.respect_optouts else [],
        enable_wandb=opts.wandb,
        wandb_project=opts.wandb_project,
        distributor=opts.distributor,
    )


def download(input_path, output_dir, **options) -> dict:
    """Download `input_path`'s URLs into WebDataset shards in `output_dir`; returns the stats dict."""
    try:
        opts = DownloadOptions(**options)
    except TypeError as err:
        known = [f.name for f in dataclasses.fields(DownloadOptions)]
        raise TypeError(f"{err}; known options: {known}") from None
    opts.validate()
    output_dir = Path(output_dir).absolute()

    # Everything that can reject the input happens here, before any network traffic.
    table = tables.read_table(input_path, opts.url_col, opts.caption_col)
    extras, columns_not_kept = tables.extra_columns(table, opts.url_col, opts.caption_col, opts.keep_columns)
    kept, dropped, hygiene = captions.apply_hygiene(
        table, opts.url_col, opts.caption_col, opts.min_caption_chars, opts.dedup_url
    )
    if len(kept) == 0:
        raise tables.InputTableError(
            f"{input_path}: every row was dropped by caption/URL hygiene {hygiene.as_dict()['dropped_by_reason']}; "
            "check the url/caption columns or lower --min-caption-chars"
        )
    _prepare_output(output_dir, _fingerprint(kept, extras, opts), opts.overwrite)
    prep = output_dir / PREP_DIR
    to_download = kept[[opts.url_col, opts.caption_col, *extras]].rename(
        columns={opts.url_col: "url", opts.caption_col: "caption"}
    )
    to_download.to_parquet(prep / "input.parquet", index=False)
    dropped.to_parquet(prep / "dropped.parquet", index=False)

    expected = [f"{i:05d}" for i in range(math.ceil(len(kept) / opts.shard_size))]
    done_before = set(shards.completed_shards(output_dir))
    processes, threads = _parallelism(opts, len(set(expected) - done_before))
    started = time.perf_counter()
    if set(expected) - done_before:  # a finished download costs no worker spawn on re-run
        _run_img2dataset(prep / "input.parquet", output_dir, opts, extras, processes, threads)
    seconds = time.perf_counter() - started

    done = [s for s in shards.completed_shards(output_dir) if s in set(expected)]
    results = shards.shard_results(output_dir, done)
    duplicates = 0
    if opts.dedup_image_hash:
        dupes = shards.image_hash_duplicates(results)
        shards.drop_samples(output_dir, dupes.groupby("shard")["key"].agg(set).to_dict())
        duplicates = len(dupes)
    sizes = shards.write_sizes(output_dir, done)
    new_urls = int(results["shard"].isin(set(done) - done_before).sum())
    result = stats.build_stats(
        input_path=str(input_path),
        hygiene=hygiene.as_dict(),
        columns_not_kept=columns_not_kept,
        results=results,
        expected_shards=expected,
        done_shards=done,
        image_duplicates=duplicates,
        sizes=sizes,
        this_run={
            "urls_downloaded": new_urls,
            "seconds": round(seconds, 3),
            "urls_per_second": round(new_urls / seconds, 2) if seconds > 0 else 0.0,
            "processes": processes,
            "threads": threads,
            "distributor": opts.distributor,
        },
        settings={k: v for k, v in dataclasses.asdict(opts).items() if k not in ("verbose",)},
    )
    shards.write_json_atomic(output_dir / "stats.json", _json_safe(result))
    if opts.verbose:
        print(stats.format_summary(result), flush=True)
    return result


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return None  # "no limit"; JSON has no infinity
    return value


def build_parser() -> argparse.ArgumentParser:
    d = DownloadOptions()
    p = argparse.ArgumentParser(prog="python -m data_prep.download", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="parquet/csv/tsv/jsonl table (or a folder of them)")
    p.add_argument("--output", required=True, help="folder for the shards, sizes.json and stats.json")
    p.add_argument("--url-col", default=d.url_col)
    p.add_argument("--caption-col", default=d.caption_col)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default=d.resize_mode)
    p.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale small images")
    p.add_argument("--encode-format", choices=ENCODE_FORMATS, default=d.encode_format)
    p.add_argument("--encode-quality", type=int, default=d.encode_quality)
    p.add_argument("--min-image-size", type=int, default=d.min_image_size)
    p.add_argument("--max-aspect-ratio", type=float, default=d.max_aspect_ratio)
    p.add_argument("--processes", type=int, default=None, help=f"default: usable CPUs ({usable_cpus()} here)")
    p.add_argument("--threads", type=int, default=None, help="per process; default 64")
    p.add_argument("--shard-size", type=int, default=d.shard_size)
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds per request")
    p.add_argument("--retries", type=int, default=d.retries)
    p.add_argument(
        "--user-agent-token",
        default=None,
        help="token added to the User-Agent; X-Robots-Tag "
        "directives addressed to it (e.g. 'mybot: noai') are respected too",
    )
    p.add_argument(
        "--no-respect-optouts",
        dest="respect_optouts",
        action="store_false",
        help="download even when X-Robots-Tag says noai/noimageai/noindex/noimageindex",
    )
    p.add_argument("--min-caption-chars", type=int, default=d.min_caption_chars)
    p.add_argument("--dedup-url", action="store_true", help="drop repeated URLs before downloading")
    p.add_argument("--dedup-image-hash", action="store_true", help="drop samples whose image bytes repeat")
    p.add_argument("--keep-columns", default=None, help="comma-separated extra columns to keep (default: all)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier download in --output")
    p.add_argument("--wandb", action="store_true", help="img2dataset's own W&B reporting")
    p.add_argument("--wandb-project", default=d.wandb_project)
    p.add_argument(
        "--distributor",
        choices=DISTRIBUTORS,
        default=d.distributor,
        help="pyspark: img2dataset's Spark distributor (the active SparkSession, else local[--processes])",
    )
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    input_path, output_dir = args.pop("input"), args.pop("output")
    if args["keep_columns"] is not None:
        args["keep_columns"] = [c.strip() for c in args["keep_columns"].split(",") if c.strip()]
    try:
        result = download(input_path, output_dir, **args)
    except (tables.InputTableError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"interrupted: {err or 'run the same command again to resume'}", file=sys.stderr)
        return 130
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
