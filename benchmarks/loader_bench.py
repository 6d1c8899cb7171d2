"""Loader throughput, side by side: clip_pl's WebDataset loader vs open_clip_train's get_wds_dataset.

    python -m benchmarks.loader_bench                           # demo shards + ≥512 px JPEG shards, 2 workers
    python -m benchmarks.loader_bench --workers 2 --json /tmp/loader_bench.json

Both loaders read the same shards with the same number of workers, the same train transform
(RandomResizedCrop(0.9, 1) bicubic + OpenAI mean/std from clip_pl.model.image_transforms) and the
same tokenizer, and make batches inside the workers. Reported: samples/s per worker in the steady
state (after each worker's first batch), one run each, and the ratio clip_pl / open_clip.

open_clip_train 3.3.0 needs webdataset 0.2.86 (0.2.111 raises KeyError 'fname', OpenCLIP #935):
it is installed with ``pip install --target`` into a side folder (--legacy-wds, fetched once if
absent) and put on PYTHONPATH for the baseline subprocess only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(os.environ.get("CLIP_PL_BENCH_DIR", "/tmp/clip_pl_bench"))


# ---- the two measured loaders (each runs in its own subprocess) ------------------------------------

def _measure(loader, workers: int, epochs: int) -> dict:
    """Steady-state rate over ``epochs`` passes: the clock starts once every worker has delivered a batch."""
    seen, timed, start = 0, 0, None
    for batch in (b for _ in range(epochs) for b in loader):
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        seen += 1
        if seen == max(1, workers):
            start = time.perf_counter()
        elif start is not None:
            timed += image.shape[0]
    seconds = time.perf_counter() - start if start is not None else float("nan")
    return {"batches": seen, "timed_samples": timed, "seconds": seconds,
            "samples_per_s": timed / seconds, "per_worker": timed / seconds / max(1, workers)}


def run_clip_pl(shards: str, image_size: int, batch_size: int, workers: int, context_length: int,
                epochs: int) -> dict:
    from clip_pl.data import WebDatasetDataModule

    dm = WebDatasetDataModule(shards, batch_size=batch_size, num_workers=workers, image_size=image_size,
                              context_length=context_length, prefetch_factor=2)  # as WebLoader's default
    dm.setup("fit")
    return _measure(dm.train_dataloader(), workers, epochs)


def run_open_clip(shards: str, image_size: int, batch_size: int, workers: int, context_length: int,
                  epochs: int) -> dict:
    import webdataset
    from open_clip_train.data import get_wds_dataset

    from clip_pl.model import get_tokenizer, image_transforms

    assert webdataset.__version__ == "0.2.86", f"baseline needs webdataset 0.2.86 on PYTHONPATH, got {webdataset.__version__}"
    sizes = json.loads((Path(shards) / "sizes.json").read_text())
    stems = ",".join(name[: -len(".tar")] for name in sorted(sizes))
    pattern = f"{shards}/{{{stems}}}.tar"  # a brace list: what both open_clip and webdataset expand
    args = argparse.Namespace(train_data=pattern, val_data=None, train_num_samples=sum(sizes.values()),
                              train_data_upsampling_factors=None, dataset_resampled=False, batch_size=batch_size,
                              workers=workers, world_size=1, seed=0)
    train_tf, _ = image_transforms(image_size)
    info = get_wds_dataset(args, train_tf, is_train=True, epoch=0, tokenizer=get_tokenizer(context_length))
    return _measure(info.dataloader, workers, epochs)


# ---- corpora -----------------------------------------------------------------------------------------

def demo_corpus(out: Path) -> Path:
    """The project's demo corpus (digits, 64 px) if data_prep.demo can build it, else similar images."""
    shards = out / "demo" / "shards"
    if (shards / "sizes.json").exists():
        return shards
    try:
        subprocess.run([sys.executable, "-m", "data_prep.demo", "--out", str(out / "demo")], cwd=REPO,
                       check=True, timeout=900, capture_output=True)
        if (shards / "sizes.json").exists():
            return shards
    except (subprocess.SubprocessError, OSError) as e:
        print(f"data_prep.demo unavailable ({e}); writing small synthetic images instead", file=sys.stderr)
    from tests.support.fake_shards import write_shards

    write_shards(str(out / "small"), [500] * 8, image_px=(64, 96))
    return out / "small"


def large_corpus(out: Path, per_shard: int) -> Path:
    target = out / "large"
    if not (target / "sizes.json").exists():
        from tests.support.fake_shards import write_shards

        write_shards(str(target), [per_shard] * 8, image_px=(512, 800))
    return target


def legacy_webdataset(folder: Path) -> Path:
    if not (folder / "webdataset" / "__init__.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(folder),
                        "webdataset==0.2.86", "--no-deps"], check=True)
    return folder


def _subprocess(which: str, shards: Path, image_size: int, epochs: int, args, legacy: Path) -> dict:
    env = dict(os.environ)
    path = [str(REPO)] + ([str(legacy)] if which == "open_clip" else [])
    env["PYTHONPATH"] = os.pathsep.join(path + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else path)
    cmd = [sys.executable, "-m", "benchmarks.loader_bench", "--measure", which, "--shards", str(shards),
           "--image-size", str(image_size), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--context-length", str(args.context_length), "--epochs", str(epochs)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{which} loader failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the benchmark shards are written/kept")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context-length", type=int, default=77)
    p.add_argument("--large-per-shard", type=int, default=100, help="samples in each of the 8 large-JPEG shards")
    p.add_argument("--legacy-wds", type=Path, default=DEFAULT_OUT / "webdataset-0.2.86")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--measure", choices=["clip_pl", "open_clip"], help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure:  # inside a subprocess: one loader, one corpus
        import torch

        torch.set_num_threads(1)
        run = run_clip_pl if args.measure == "clip_pl" else run_open_clip
        print(json.dumps(run(args.shards, args.image_size, args.batch_size, args.workers, args.context_length,
                             args.epochs)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    legacy = legacy_webdataset(args.legacy_wds)
    # Passes over each corpus, so that each timed window lasts several seconds on a shared 2-core box.
    corpora = [("demo shards (digits, 64 px stored)", demo_corpus(args.out), 64, 5),
               ("large JPEGs (512-800 px)", large_corpus(args.out, args.large_per_shard), 224, 4)]
    rows = []
    for name, shards, image_size, epochs in corpora:
        baseline = _subprocess("open_clip", shards, image_size, epochs, args, legacy)
        ours = _subprocess("clip_pl", shards, image_size, epochs, args, legacy)
        rows.append({"corpus": name, "shards": str(shards), "image_size": image_size, "workers": args.workers,
                     "batch_size": args.batch_size, "open_clip": baseline, "clip_pl": ours,
                     "ratio": ours["per_worker"] / baseline["per_worker"]})
    print(f"{'corpus':<36} {'img':>4} {'open_clip /s/worker':>20} {'clip_pl /s/worker':>18} {'ratio':>6}")
    for r in rows:
        print(f"{r['corpus']:<36} {r['image_size']:>4} {r['open_clip']['per_worker']:>20.1f} "
              f"{r['clip_pl']['per_worker']:>18.1f} {r['ratio']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
