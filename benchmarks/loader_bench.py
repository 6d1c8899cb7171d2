"""Loader throughput, side by side: clip_pl's WebDataset loader vs open_clip_train's get_wds_dataset.

    python -m benchmarks.loader_bench                           # demo shards + ≥512 px JPEG shards, 2 workers
    python -m benchmarks.loader_bench --workers 2 --json /tmp/loader_bench.json
    python -m benchmarks.loader_bench --per-core                # one core: the loader vs decode alone

``--per-core`` measures, in one process on one thread (what one DataLoader worker has), on 256-px
(LAION-like) and 512–800-px shards made locally: the decode-only rate (the same JPEG bytes through
PIL with draft mode and through ``torchvision.io.decode_jpeg``, the faster counts, nothing else) and
the whole CPU path (tar reading, decode, crop/resize to uint8, tokenize, collate:
``WebDatasetDataModule`` with num_workers=0), interleaved over a few rounds (best of each), their
ratio, and the cores needed to feed 3 200 (ViT-B/16) and 9 000 (ViT-B/32) samples/s at that rate;
the same for ``data.resize_on=device`` (the worker's share) and the CPU cost of
``data.decode_on=device`` (the worker's share: tar reading, JPEG header, crop box, tokenize; the
decode itself runs on the training device and is not in this number). Each path is also run in one
real worker process (num_workers=1, this process only receiving): that rate includes the
shared-memory transport to the training process, which every loader shipping those bytes pays.

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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(os.environ.get("CLIP_PL_BENCH_DIR", "/tmp/clip_pl_bench"))


# ---- the two measured loaders (each runs in its own subprocess) ------------------------------------


def _measure(loader, workers: int, epochs: int) -> dict:
    """Steady-state rate over ``epochs`` passes: the clock starts once every worker has delivered a batch."""
    seen, timed, start = 0, 0, None
    for batch in (b for _ in range(epochs) for b in loader):
        rows = (batch["text"] if isinstance(batch, dict) else batch[0]).shape[0]  # text: every path has it
        seen += 1
        if seen == max(1, workers):
            start = time.perf_counter()
        elif start is not None:
            timed += rows
    seconds = time.perf_counter() - start if start is not None else float("nan")
    return {
        "batches": seen,
        "timed_samples": timed,
        "seconds": seconds,
        "samples_per_s": timed / seconds,
        "per_worker": timed / seconds / max(1, workers),
    }


def run_clip_pl(shards: str, image_size: int, batch_size: int, workers: int, context_length: int, epochs: int) -> dict:
    from clip_pl.data import WebDatasetDataModule

    dm = WebDatasetDataModule(
        shards,
        batch_size=batch_size,
        num_workers=workers,
        image_size=image_size,
        context_length=context_length,
        prefetch_factor=2,
    )  # as WebLoader's default
    dm.setup("fit")
    return _measure(dm.train_dataloader(), workers, epochs)


def run_open_clip(
    shards: str, image_size: int, batch_size: int, workers: int, context_length: int, epochs: int
) -> dict:
    import webdataset
    from open_clip_train.data import get_wds_dataset

    from clip_pl.model import get_tokenizer, image_transforms

    assert webdataset.__version__ == "0.2.86", (
        f"baseline needs webdataset 0.2.86 on PYTHONPATH, got {webdataset.__version__}"
    )
    sizes = json.loads((Path(shards) / "sizes.json").read_text())
    stems = ",".join(name[: -len(".tar")] for name in sorted(sizes))
    pattern = f"{shards}/{{{stems}}}.tar"  # a brace list: what both open_clip and webdataset expand
    args = argparse.Namespace(
        train_data=pattern,
        val_data=None,
        train_num_samples=sum(sizes.values()),
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        batch_size=batch_size,
        workers=workers,
        world_size=1,
        seed=0,
    )
    train_tf, _ = image_transforms(image_size)
    info = get_wds_dataset(args, train_tf, is_train=True, epoch=0, tokenizer=get_tokenizer(context_length))
    return _measure(info.dataloader, workers, epochs)


# ---- one core: the CPU path against decoding alone ------------------------------------------------

TARGETS = {"ViT-B/16": 3200, "ViT-B/32": 9000}  # samples/s one H100/H200 trains at 40 % MFU (issue #16)


def _samples(shards: Path) -> list[dict]:
    from clip_pl.data.reader import read_shard

    sizes = json.loads((shards / "sizes.json").read_text())
    return [s for name in sorted(sizes) for s in read_shard(str(shards / name))]


def _rate(count: int, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def run_per_core(shards: str, image_size: int, batch_size: int, context_length: int, rounds: int) -> dict:
    """See the module doc. Besides the two loaders, each stage a CPU path cannot skip is timed alone on the
    same samples (tar reading, tokenizing, crop + resize of the decoded pixels): their sum with the decode
    is the best any loader made of these stages could do, its ``ceiling``."""
    from collections import Counter

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from clip_pl.data import WebDatasetDataModule
    from clip_pl.data.decode import decode_caption, decode_image, decode_pixels

    samples = _samples(Path(shards))
    blobs = [{"jpg": s["jpg"]} for s in samples]
    captions = [decode_caption(s) for s in samples]
    loaders = {}
    for name, decode_on, resize_on in (
        ("cpu", "cpu", None),
        ("device", "device", None),
        ("resize_on_device", "cpu", "device"),
    ):
        for workers in (0, 1):  # in this thread; in one worker process (shared-memory transport included)
            dm = WebDatasetDataModule(
                shards,
                batch_size=batch_size,
                num_workers=workers,
                image_size=image_size,
                context_length=context_length,
                decode_on=decode_on,
                resize_on=resize_on,
            )
            dm.setup("fit")
            loaders[name if workers == 0 else f"{name}_worker"] = dm.train_dataloader()
    stream = loaders["cpu"].dataset
    decoded = [decode_pixels(b, image_size, Counter()) for b in blobs]  # the resize stage's input
    stages = {
        # decode only, two ways: PIL as the loader used before (pixels left in PIL's memory, no copy out),
        # and torchvision's decode_jpeg into a tensor (no reduced-scale decode: slower on large JPEGs).
        "decode_pil": lambda: [decode_image(b, image_size, Counter()) for b in blobs],
        "decode_torchvision": lambda: [
            decode_jpeg(torch.frombuffer(bytearray(b["jpg"]), dtype=torch.uint8), mode=ImageReadMode.RGB) for b in blobs
        ],
        "tar": lambda: _samples(Path(shards)),
        "tokenize": lambda: [
            stream.tokenizer(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)
        ],
        "crop_resize": lambda: [stream.transform.per_image(x) for x in decoded],
        "cpu_path": lambda: sum(batch["text"].shape[0] for batch in loaders["cpu"]),  # one exact epoch
        "device_path_cpu": lambda: sum(batch["text"].shape[0] for batch in loaders["device"]),
        "resize_on_device_cpu": lambda: sum(batch["text"].shape[0] for batch in loaders["resize_on_device"]),
    }
    rates: dict[str, list[float]] = {
        name: [] for name in (*stages, *(f"{n}_worker" for n in ("cpu", "device", "resize_on_device")))
    }
    for _ in range(rounds):  # interleaved, so all see the same load on a shared box
        for name, work in stages.items():
            rates[name].append(_rate(len(samples), work))
        for name in ("cpu_worker", "device_worker", "resize_on_device_worker"):
            rates[name].append(_measure(loaders[name], 1, 1)["samples_per_s"])  # after the worker's first batch
    best = {name: max(r) for name, r in rates.items()}
    decode = max(best["decode_pil"], best["decode_torchvision"])  # the faster decode is the reference
    fixed = 1 / best["tar"] + 1 / best["tokenize"]
    ceiling = 1 / (1 / decode + fixed + 1 / best["crop_resize"])
    ceiling_without_resize = 1 / (1 / decode + fixed)
    path, device, split = best["cpu_path"], best["device_path_cpu"], best["resize_on_device_cpu"]
    return {
        "samples": len(samples),
        "decode_only": decode,
        "cpu_path": path,
        "ratio": path / decode,
        "resize_on_device_cpu": split,
        "resize_on_device_ratio": split / decode,
        "cores_needed_resize_on_device": {name: target / split for name, target in TARGETS.items()},
        "ceiling": ceiling,
        "ceiling_ratio": ceiling / decode,
        "ceiling_ratio_without_resize": ceiling_without_resize / decode,
        "device_path_cpu": device,
        "stage_rates": best,
        "cores_needed": {name: target / path for name, target in TARGETS.items()},
        "cores_needed_device_path": {name: target / device for name, target in TARGETS.items()},
        "one_worker": {
            "cpu_path": best["cpu_worker"],
            "resize_on_device": best["resize_on_device_worker"],
            "device_path": best["device_worker"],
        },
        "rounds": rates,
    }


def per_core_report(args) -> list[dict]:
    corpora = [
        ("synthetic JPEGs (256 px)", laion_like_corpus(args.out, args.laion_per_shard)),
        ("photo JPEGs (256 px, q95)", photo_corpus(args.out, args.laion_per_shard)),
        ("large JPEGs (512-800 px)", large_corpus(args.out, args.large_per_shard)),
    ]
    rows = []
    for name, shards in corpora:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.loader_bench",
            "--measure",
            "per_core",
            "--shards",
            str(shards),
            "--image-size",
            "224",
            "--batch-size",
            str(args.batch_size),
            "--context-length",
            str(args.context_length),
            "--epochs",
            str(args.rounds),
        ]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"per-core measurement failed:\n{done.stderr[-3000:]}")
        rows.append({"corpus": name, **json.loads(done.stdout.strip().splitlines()[-1])})
    print(
        f"{'corpus (224 px out, 1 thread)':<28} {'decode /s':>9} {'CPU path /s':>11} {'ratio':>5} "
        f"{'ceiling':>7} {'resize on device /s':>19} {'ratio':>5} {'ceiling':>7} {'cores B/16':>10} "
        f"{'cores B/32':>10} {'device path CPU /s':>18} {'cores B/32':>10}"
    )
    for r in rows:
        need, split, device = r["cores_needed"], r["cores_needed_resize_on_device"], r["cores_needed_device_path"]
        print(
            f"{r['corpus']:<28} {r['decode_only']:>9.0f} {r['cpu_path']:>11.0f} {r['ratio']:>5.2f} "
            f"{r['ceiling_ratio']:>7.2f} {r['resize_on_device_cpu']:>19.0f} {r['resize_on_device_ratio']:>5.2f} "
            f"{r['ceiling_ratio_without_resize']:>7.2f} {need['ViT-B/16']:>4.1f}|{split['ViT-B/16']:<5.1f} "
            f"{need['ViT-B/32']:>4.1f}|{split['ViT-B/32']:<5.1f} {r['device_path_cpu']:>18.0f} "
            f"{device['ViT-B/32']:>10.1f}"
        )
    print(
        f"{'one worker process (transport included)':<40} {'CPU path /s':>11} {'ratio':>5} "
        f"{'resize on device /s':>19} {'ratio':>5} {'device path /s':>14}"
    )
    for r in rows:
        one = r["one_worker"]
        print(
            f"{r['corpus']:<40} {one['cpu_path']:>11.0f} {one['cpu_path'] / r['decode_only']:>5.2f} "
            f"{one['resize_on_device']:>19.0f} {one['resize_on_device'] / r['decode_only']:>5.2f} "
            f"{one['device_path']:>14.0f}"
        )
    print(
        "stage rates (samples/s, best round): "
        + "; ".join(f"{r['corpus']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_rates"].items()) for r in rows)
    )
    return rows


# ---- corpora -----------------------------------------------------------------------------------------


def demo_corpus(out: Path) -> Path:
    """The project's demo corpus (digits, 64 px) if data_prep.demo can build it, else similar images."""
    shards = out / "demo" / "shards"
    if (shards / "sizes.json").exists():
        return shards
    try:
        subprocess.run(
            [sys.executable, "-m", "data_prep.demo", "--out", str(out / "demo")],
            cwd=REPO,
            check=True,
            timeout=900,
            capture_output=True,
        )
        if (shards / "sizes.json").exists():
            return shards
    except (subprocess.SubprocessError, OSError) as e:
        print(f"data_prep.demo unavailable ({e}); writing small synthetic images instead", file=sys.stderr)
    from tests.support.fake_shards import write_shards

    write_shards(str(out / "small"), [500] * 8, image_px=(64, 96))
    return out / "small"


def laion_like_corpus(out: Path, per_shard: int) -> Path:
    """JPEGs stored at 256 px, as img2dataset writes LAION for 224-px training."""
    target = out / "laion256"
    if not (target / "sizes.json").exists():
        from tests.support.fake_shards import write_shards

        write_shards(str(target), [per_shard] * 8, image_px=(256, 256))
    return target


def photo_corpus(out: Path, per_shard: int) -> Path:
    """256-px JPEGs at quality 95 (img2dataset's default) cut from the two photographs scikit-learn ships:
    real-photo detail, which the synthetic images lack, costs the JPEG decoder more per pixel."""
    target = out / "photo256"
    if not (target / "sizes.json").exists():
        import io
        import random

        from PIL import Image
        from sklearn.datasets import load_sample_images

        from tests.support.fake_shards import make_sample, write_shards

        photos = [Image.fromarray(a) for a in load_sample_images().images]

        def sample(key: str, index: int) -> dict[str, bytes]:
            rng = random.Random(index)
            photo = photos[index % len(photos)]
            side = rng.randint(160, min(photo.size))
            width = min(photo.width, int(side * rng.uniform(0.75, 1.33)))
            left, top = rng.randint(0, photo.width - width), rng.randint(0, photo.height - side)
            crop = photo.crop((left, top, left + width, top + side))
            scale = 256 / min(crop.size)  # shortest side 256, as img2dataset's keep_ratio writes
            crop = crop.resize(
                (max(256, round(crop.width * scale)), max(256, round(crop.height * scale))), Image.BICUBIC
            )
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=95)
            return {**make_sample(key, index, (8, 8)), "jpg": buf.getvalue()}

        write_shards(str(target), [per_shard] * 8, sample_fn=sample)
    return target


def large_corpus(out: Path, per_shard: int) -> Path:
    target = out / "large"
    if not (target / "sizes.json").exists():
        from tests.support.fake_shards import write_shards

        write_shards(str(target), [per_shard] * 8, image_px=(512, 800))
    return target


def legacy_webdataset(folder: Path) -> Path:
    if not (folder / "webdataset" / "__init__.py").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(folder), "webdataset==0.2.86", "--no-deps"],
            check=True,
        )
    return folder


def _subprocess(which: str, shards: Path, image_size: int, epochs: int, args, legacy: Path) -> dict:
    env = dict(os.environ)
    path = [str(REPO)] + ([str(legacy)] if which == "open_clip" else [])
    env["PYTHONPATH"] = os.pathsep.join(path + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else path)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.loader_bench",
        "--measure",
        which,
        "--shards",
        str(shards),
        "--image-size",
        str(image_size),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--context-length",
        str(args.context_length),
        "--epochs",
        str(epochs),
    ]
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
    p.add_argument("--per-core", action="store_true", help="one core: the CPU path vs decode-only (see above)")
    p.add_argument("--laion-per-shard", type=int, default=150, help="samples in each of the 8 256-px shards")
    p.add_argument("--rounds", type=int, default=3, help="--per-core: interleaved rounds, best of each is kept")
    p.add_argument("--measure", choices=["clip_pl", "open_clip", "per_core"], help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure:  # inside a subprocess: one loader, one corpus
        import torch

        torch.set_num_threads(1)  # what a DataLoader worker gets
        if args.measure == "per_core":
            print(
                json.dumps(
                    run_per_core(args.shards, args.image_size, args.batch_size, args.context_length, args.epochs)
                )
            )
            return 0
        run = run_clip_pl if args.measure == "clip_pl" else run_open_clip
        print(
            json.dumps(
                run(args.shards, args.image_size, args.batch_size, args.workers, args.context_length, args.epochs)
            )
        )
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    if args.per_core:
        rows = per_core_report(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    legacy = legacy_webdataset(args.legacy_wds)
    # Passes over each corpus, so that each timed window lasts several seconds on a shared 2-core box.
    corpora = [
        ("demo shards (digits, 64 px stored)", demo_corpus(args.out), 64, 5),
        ("large JPEGs (512-800 px)", large_corpus(args.out, args.large_per_shard), 224, 4),
    ]
    rows = []
    for name, shards, image_size, epochs in corpora:
        baseline = _subprocess("open_clip", shards, image_size, epochs, args, legacy)
        ours = _subprocess("clip_pl", shards, image_size, epochs, args, legacy)
        rows.append(
            {
                "corpus": name,
                "shards": str(shards),
                "image_size": image_size,
                "workers": args.workers,
                "batch_size": args.batch_size,
                "open_clip": baseline,
                "clip_pl": ours,
                "ratio": ours["per_worker"] / baseline["per_worker"],
            }
        )
    print(f"{'corpus':<36} {'img':>4} {'open_clip /s/worker':>20} {'clip_pl /s/worker':>18} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['corpus']:<36} {r['image_size']:>4} {r['open_clip']['per_worker']:>20.1f} "
            f"{r['clip_pl']['per_worker']:>18.1f} {r['ratio']:>6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
