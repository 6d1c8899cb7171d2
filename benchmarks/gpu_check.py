"""The GPU check: clip_pl next to OpenCLIP's own training loop on one GPU, in one prepared command.

    bash benchmarks/build_wheelhouse.sh            # here, once: .wheelhouse/ (what the GPU machine lacks)
    bash benchmarks/gpu.sh "$OUT"                  # on the GPU machine: install the wheels, run all, write $OUT/
    bash benchmarks/gpu.sh --device cpu /tmp/gc    # the CPU dry-run (tiny model, 3 steps): tests/test_gpu_check.py
    python -m benchmarks.gpu_check all --device cpu --out /tmp/gc          # what gpu.sh runs after installing
    python -m benchmarks.gpu_check side --side clip_pl --model tiny --device cpu --result /tmp/r.json   # one run

Every run is a fresh process with its own timeout, inside one overall budget (``Plan.budget_s``):

* ``side``: one training run, either clip_pl (the real LightningModule and Trainer from the Hydra
  config, ``build_module``/``build_trainer``) or OpenCLIP (``open_clip_train.train.train_one_epoch``
  with OpenCLIP's own AdamW groups, cosine schedule and ``ClipLoss``). Both get the same initial
  weights (same seed, same constructor, checked by a fingerprint), the same few pre-made batches
  resident on the device and cycled (no data loading in the measured loop), the same cuDNN/TF32
  settings, bf16 autocast. Timed: ``steps`` steps after ``warmup``, between two synchronised
  timestamps. Reported: samples/s, step time, MFU (model FLOPs from FlopCounterMode against the
  device's dense peak, ``clip_pl.callbacks.telemetry.PEAK_FLOPS``), peak memory, the per-step losses (the
  first ``trajectory_steps`` are compared across sides), and a ``torch.profiler`` table of the top
  kernels over ``profile_steps`` further steps. clip_pl also runs with ``model.compile=true``,
  ``model.grad_cache_chunks=4`` and ``strategy=deepspeed_stage_2``.
* ``loader``: clip_pl's real WebDataset loader alone, on JPEG shards written locally (512-800 px),
  at 224 px with 12 workers: samples/s, to hold against the GPU's (is the GPU fed?).
  ``loader_device``: the same with ``data.decode_on=device``: workers ship JPEG bytes, each batch is
  moved to the device and decoded/cropped/normalised there (``CLIPModule.on_after_batch_transfer``'s
  code, ``clip_pl.data.device_decode``), synchronised per batch. ``loader_resize_device``: the same with
  ``data.resize_on=device``: workers decode and crop, each batch's crops are resized on the device
  (``clip_pl.data.device_resize``).
* ``env``: the device, library versions and a bf16 matmul's TFLOP/s (the practical ceiling).

``all`` runs them in order of importance and writes ``results.json``, ``results.md`` (the table for
benchmarks/RESULTS.md), ``profiles.txt`` and ``gpu_check.log`` (every run's output) to ``--out``;
its exit status is 0 when every run finished, the weights matched and the loss trajectories agree.
The goals (ratios, loader vs GPU) are reported, never asserted: benchmarks report, tests assert.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Loss trajectories of two bf16 runs agree when every step's losses differ by at most a few bf16
# roundings (relative 2^-8 each): OpenCLIP computes the logits in bf16 under autocast, clip_pl in fp32.
BF16_TOLERANCE = 2.0**-6
MIN_RUN_S = 20  # a run is skipped, not started, with less of the budget left than this


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one device runs. ``cuda``: the real check (well inside 8 min on an H200); ``cpu``: the dry-run."""

    models: tuple[str, ...]
    variant_model: str
    precision: str
    batch_size: int
    warmup: int
    steps: int
    profile_steps: int
    n_batches: int  # distinct pre-made batches, cycled
    trajectory_steps: int
    loader_workers: int
    loader_images: int
    loader_image_px: tuple[int, int]
    loader_image_size: int
    loader_batch_size: int
    budget_s: float
    timeouts: dict[str, float]
    compile_backend: str | None = None  # None: torch.compile's default (inductor)


PLANS = {
    "cuda": Plan(
        models=("vit_b16", "vit_b32"),
        variant_model="vit_b16",
        precision="bf16-mixed",
        batch_size=256,
        warmup=10,
        steps=50,
        profile_steps=3,
        n_batches=4,
        trajectory_steps=20,
        loader_workers=12,
        loader_images=12 * 4 * 256,
        loader_image_px=(512, 800),
        loader_image_size=224,
        loader_batch_size=256,
        budget_s=420,
        timeouts={"env": 60, "side": 120, "compile": 240, "deepspeed": 150, "loader": 150},
    ),
    "cpu": Plan(
        models=("tiny",),
        variant_model="tiny",
        precision="bf16-mixed",
        batch_size=8,
        warmup=1,
        steps=3,
        profile_steps=1,
        n_batches=2,
        trajectory_steps=20,
        loader_workers=2,
        loader_images=64,
        loader_image_px=(64, 96),
        loader_image_size=64,
        loader_batch_size=8,
        budget_s=430,
        timeouts={"env": 60, "side": 120, "compile": 200, "deepspeed": 240, "loader": 120},
        compile_backend="aot_eager",
    ),
}
# clip_pl's variants: Hydra overrides on top of the plain run.
VARIANTS = {
    "compile": ["model.compile=true"],
    "grad_cache4": ["model.grad_cache_chunks=4"],
    "deepspeed2": ["strategy=deepspeed_stage_2"],
}


# =============================================================================== shared pieces


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def mark(device: str) -> float:
    """A timestamp after every queued kernel has finished: both sides are timed this way."""
    synchronize(device)
    return time.perf_counter()


def backend_settings(device: str) -> dict[str, Any]:
    """The same cuDNN/TF32 settings on both sides (PyTorch's defaults, plus cuDNN autotuning, which
    clip_pl's trainer config turns on); returned so the report shows what ran."""
    import torch

    torch.backends.cudnn.benchmark = device == "cuda"
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return current_backend_settings()


def current_backend_settings() -> dict[str, Any]:
    import torch

    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def make_batches(n: int, batch_size: int, image_size: int, context_length: int, device: str, seed: int = 1234):
    """``n`` batches made on the device itself (a generator there), the same on both sides: random
    normalised-looking images and token sequences of random length ending in EOT, where the text
    tower pools."""
    import torch

    from clip_pl.data.synthetic import _EOT, _SOT, _VOCAB_WORDS

    gen = torch.Generator(device=device).manual_seed(seed)
    positions = torch.arange(context_length, device=device)
    batches = []
    for _ in range(n):
        images = torch.randn(batch_size, 3, image_size, image_size, generator=gen, device=device)
        lengths = torch.randint(3, context_length + 1, (batch_size, 1), generator=gen, device=device)
        words = torch.randint(1, _VOCAB_WORDS, (batch_size, context_length), generator=gen, device=device)
        text = torch.where(positions < lengths - 1, words, torch.zeros_like(words))
        text[:, 0] = _SOT
        text.scatter_(1, lengths - 1, _EOT)
        batches.append({"image": images, "text": text})
    return batches


class CycledBatches:
    """``total`` batches taken in turn from a few pre-made device-resident ones: nothing is loaded
    or copied in the measured loop. ``on_fetch(i)`` runs as batch ``i`` is handed out."""

    def __init__(
        self, batches: list[dict], total: int, as_tuple: bool = False, on_fetch: Callable[[int], None] | None = None
    ):
        self.batches, self.total, self.as_tuple, self.on_fetch = batches, total, as_tuple, on_fetch
        self.num_batches, self.num_samples = total, total * batches[0]["image"].shape[0]  # what open_clip reads

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator:
        for i in range(self.total):
            if self.on_fetch is not None:
                self.on_fetch(i)
            batch = self.batches[i % len(self.batches)]
            yield (batch["image"], batch["text"]) if self.as_tuple else batch


def weights_fingerprint(model) -> list[float]:
    """Sum and sum of squares of every parameter (float64): equal on both sides or the run is void."""
    import torch

    with torch.no_grad():
        params = [p.detach().double() for p in model.parameters()]
        return [float(sum(p.sum() for p in params)), float(sum((p * p).sum() for p in params))]


class Profile:
    """``torch.profiler`` over a few steps: the top kernels (or CPU ops) and how busy the GPU was."""

    def __init__(self, device: str):
        import torch

        self.device = device
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.result: dict[str, Any] | None = None

    def start(self) -> None:
        self.started = mark(self.device)
        self.profiler.start()

    def stop(self, steps: int) -> None:
        from torch.autograd import DeviceType

        synchronize(self.device)
        self.profiler.stop()
        wall_ms = (time.perf_counter() - self.started) * 1e3
        events = self.profiler.key_averages()
        key = "self_device_time_total" if self.device == "cuda" else "self_cpu_time_total"
        if self.device == "cuda" and not hasattr(events[0], key):  # torch < 2.4 named it after CUDA
            key = "self_cuda_time_total"
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)
        top = [{"name": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count} for e in ranked[:12]]
        kernels_ms = None
        if self.device == "cuda":  # kernel time only (device events), not the CPU ops that launched them
            kernels_ms = sum(getattr(e, key) for e in events if e.device_type == DeviceType.CUDA) / 1e3
        self.result = {
            "steps": steps,
            "wall_ms": wall_ms,
            "sorted_by": key,
            "top": top,
            "gpu_busy_share": kernels_ms / wall_ms if kernels_ms is not None else None,
            "table": events.table(sort_by=key, row_limit=15),
        }


def memory_report(device: str) -> dict[str, float]:
    if device == "cuda":
        import torch

        return {
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
        }
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB


# =============================================================================== one training run


def compose(args, root: str, extra: list[str]):
    """clip_pl's Hydra config for this run; the OpenCLIP side reads the model and optimiser from it too."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from clip_pl.config_dir import config_dir

    total = args.warmup + args.steps + args.profile_steps
    overrides = [
        f"model={args.model}",
        "data=synthetic",
        f"data.batch_size={args.batch_size}",
        f"data.num_samples={args.batch_size * total}",
        "global_batch_size=null",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        f"trainer.precision={args.precision}",
        f"trainer.max_steps={total}",
        f"trainer.benchmark={str(args.device == 'cuda').lower()}",
        "trainer.enable_model_summary=false",
        f"scheduler.warmup_steps={min(5, total - 1)}",
        "logger=csv",
        "eval=none",
        "resume=none",
        # No checkpoint is written (the default saves one at the last step). The progress bar
        # stays: clip_pl's own, refreshed every 10 steps like OpenCLIP's log (each reads the loss).
        "callbacks.checkpoint=null",
        "+trainer.enable_checkpointing=false",
        f"paths.root_dir={root}",
        "run_name=gpu_check",
        *extra,
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def measured(args, clock: dict[str, float], losses: list, profile: Profile, cfg, fingerprint) -> dict[str, Any]:
    """The numbers of one run, the same formulas for both sides."""
    import torch
    from omegaconf import OmegaConf

    from clip_pl.callbacks.telemetry import peak_flops_per_device, train_flops_per_sample
    from clip_pl.model import resolve_model_config

    seconds = clock["end"] - clock["start"]
    samples_per_s = args.steps * args.batch_size / seconds
    model_config = resolve_model_config(**OmegaConf.to_container(cfg.model, resolve=True))
    flops = train_flops_per_sample(model_config)["train"]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_flops_per_device(device_name, args.precision) if args.device == "cuda" else None
    return {
        "samples_per_s": samples_per_s,
        "step_ms": seconds / args.steps * 1e3,
        "tflops": samples_per_s * flops / 1e12,
        "mfu": samples_per_s * flops / peak if peak else None,
        "peak_flops": peak,
        "train_flops_per_sample": flops,
        "device_name": device_name,
        "losses": [float(v) for v in torch.stack([loss.float() for loss in losses]).cpu()],
        "weights_fingerprint": fingerprint,
        "profile": profile.result,
        **memory_report(args.device),
    }


def run_clip_pl(args, batches: list[dict]) -> dict[str, Any]:
    import lightning as L

    from clip_pl.assembly import build_module, build_trainer
    from clip_pl.callbacks.telemetry import Telemetry
    from clip_pl.config_checks import prepare_config

    root = tempfile.mkdtemp(prefix="gpu_check_clip_pl_")
    cfg = prepare_config(compose(args, root, VARIANTS.get(args.variant, [])))
    if args.compile_backend:
        use_compile_backend(args.compile_backend)
    L.seed_everything(cfg.seed)
    module = build_module(cfg)
    fingerprint = weights_fingerprint(module.model)
    clock: dict[str, float] = {}
    losses: list = []
    profile = Profile(args.device)
    first_profiled = args.warmup + args.steps

    class Hooks(L.Callback):
        """Runs after clip_pl's own callbacks: the window is whole steps of the real loop."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                clock["start"] = mark(args.device)
            if batch_idx == first_profiled and args.profile_steps:
                profile.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((outputs["loss"] if isinstance(outputs, dict) else outputs).detach())  # no sync
            if batch_idx == first_profiled - 1:
                clock["end"] = mark(args.device)
            if batch_idx == first_profiled + args.profile_steps - 1 and args.profile_steps:
                profile.stop(args.profile_steps)

    trainer = build_trainer(cfg, Path(root) / "runs" / "gpu_check")
    trainer.callbacks.append(Hooks())
    trainer.fit(module, train_dataloaders=CycledBatches(batches, args.warmup + args.steps + args.profile_steps))
    telemetry = next((c for c in trainer.callbacks if isinstance(c, Telemetry)), None)
    result = measured(args, clock, losses, profile, cfg, fingerprint)
    result["telemetry"] = getattr(telemetry, "last_metrics", None)  # what the run itself logged last
    result["strategy"] = type(trainer.strategy).__name__
    result["no_decay_parameters"] = sorted(module.no_decay_names)  # to hold against open_clip's rule
    if args.variant == "compile":
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = int(counters["stats"]["unique_graphs"])  # > 0: dynamo really traced it
    shutil.rmtree(root, ignore_errors=True)
    return result


def use_compile_backend(backend: str) -> None:
    """Make ``nn.Module.compile()`` (what ``model.compile=true`` calls) use ``backend``. The CPU dry-run
    uses "aot_eager": dynamo and AOTAutograd capture the same forward and backward graphs, and only
    inductor's C++ code generation (about 2 minutes on 2 busy cores) is left out; inductor on CPU is
    tests/test_compile.py's job, inductor on the GPU the real check's."""
    import torch

    compile_module = torch.nn.Module.compile

    def compile_with_backend(module, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        return compile_module(module, *args, **kwargs)

    torch.nn.Module.compile = compile_with_backend


class RecordingLoss:
    """OpenCLIP's loss, unchanged, keeping each step's total (detached, no sync) for the trajectory."""

    def __init__(self, loss):
        self.loss, self.values = loss, []

    def __call__(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        self.values.append((sum(out.values()) if isinstance(out, dict) else out).detach())
        return out


def run_open_clip(args, batches: list[dict]) -> dict[str, Any]:
    """OpenCLIP's own loop: ``open_clip_train.train.train_one_epoch`` (autocast bf16, ClipLoss, AdamW,
    no GradScaler in bf16, the in-place clamp of logit_scale to ln 100 after each step), with the
    optimiser groups and cosine schedule its ``main.py`` builds."""
    import lightning as L
    import open_clip
    import torch
    from open_clip_train.data import DataInfo
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from clip_pl.assembly import build_module

    root = tempfile.mkdtemp(prefix="gpu_check_open_clip_")
    cfg = compose(args, root, [])
    L.seed_everything(cfg.seed)
    model = build_module(cfg).model  # the same open_clip CLIP, built after the same seed: the same weights
    fingerprint = weights_fingerprint(model)
    model.output_dict = True  # as open_clip.create_model_and_transforms makes it for training
    model.to(args.device)
    total = args.warmup + args.steps + args.profile_steps
    opt = cfg.optim
    precision = {"bf16-mixed": "amp_bf16", "16-mixed": "amp", "32": "fp32"}[args.precision]
    oc_args = parse_args(
        [
            "--batch-size",
            str(args.batch_size),
            "--precision",
            precision,
            "--lr",
            str(opt.lr),
            "--wd",
            str(opt.weight_decay),
            "--beta1",
            str(opt.betas[0]),
            "--beta2",
            str(opt.betas[1]),
            "--eps",
            str(opt.eps),
            "--warmup",
            str(cfg.scheduler.warmup_steps),
            "--log-every-n-steps",
            str(cfg.trainer.log_every_n_steps),
            "--local-loss",
            "--gather-with-grad",
        ]
    )
    oc_args.device, oc_args.world_size, oc_args.rank, oc_args.local_rank = args.device, 1, 0, 0
    oc_args.distributed, oc_args.horovod, oc_args.wandb, oc_args.distill = False, False, False, False
    # open_clip_train/main.py: no weight decay on gains, biases and the temperature.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": opt.weight_decay},
        ],
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
    )
    # The same warmup-then-cosine multipliers as clip_pl.schedule.warmup_cosine, over the same steps.
    scheduler = cosine_lr(optimizer, opt.lr, cfg.scheduler.warmup_steps, total)
    loss = RecordingLoss(open_clip.create_loss(oc_args))
    clock: dict[str, float] = {}
    profile = Profile(args.device)
    first_profiled = args.warmup + args.steps

    def on_fetch(i: int) -> None:  # batch i is fetched once step i-1 is complete (logging and clamp included)
        if i == args.warmup:
            clock["start"] = mark(args.device)
        if i == first_profiled:
            clock["end"] = mark(args.device)
            if args.profile_steps:
                profile.start()

    loader = CycledBatches(batches, total, as_tuple=True, on_fetch=on_fetch)
    train_one_epoch(model, {"train": DataInfo(loader)}, loss, 0, optimizer, None, scheduler, None, oc_args)
    if args.profile_steps:
        profile.stop(args.profile_steps)
    else:
        clock["end"] = mark(args.device)
    result = measured(args, clock, loss.values, profile, cfg, fingerprint)
    result["no_decay_parameters"] = sorted(n for n, p in named if exclude(n, p))
    shutil.rmtree(root, ignore_errors=True)
    return result


def run_side(args) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from clip_pl.model import context_length_of, image_size_of, resolve_model_config

    settings = backend_settings(args.device)
    cfg = compose(args, tempfile.gettempdir(), [])
    model_config = resolve_model_config(**OmegaConf.to_container(cfg.model, resolve=True))
    batches = make_batches(
        args.n_batches, args.batch_size, image_size_of(model_config), context_length_of(model_config), args.device
    )
    run = run_clip_pl if args.side == "clip_pl" else run_open_clip
    result = run(args, batches)
    result.update(
        side=args.side,
        model=args.model,
        variant=args.variant,
        batch_size=args.batch_size,
        precision=args.precision,
        warmup=args.warmup,
        steps=args.steps,
        n_batches=args.n_batches,
        backend_settings=settings,
        backend_settings_after=current_backend_settings(),
    )
    return result


# =============================================================================== the loader alone


def _write_shard(job: tuple[str, int, int, tuple[int, int]]) -> None:
    from tests.support.fake_shards import make_sample, write_shard

    path, first, count, image_px = job
    stem = Path(path).stem
    write_shard(path, [make_sample(f"{stem}{i:05d}", first + i, image_px) for i in range(count)])


def write_jpeg_shards(directory: Path, images: int, per_shard: int, image_px: tuple[int, int]) -> Path:
    """img2dataset-style shards of synthetic photos-like JPEGs, written by all cores at once."""
    import multiprocessing

    directory.mkdir(parents=True, exist_ok=True)
    jobs, sizes = [], {}
    for shard, first in enumerate(range(0, images, per_shard)):
        count = min(per_shard, images - first)
        jobs.append((str(directory / f"{shard:05d}.tar"), first, count, image_px))
        sizes[f"{shard:05d}.tar"] = count
    with multiprocessing.get_context("fork").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.map(_write_shard, jobs)
    (directory / "sizes.json").write_text(json.dumps(sizes))
    return directory


def decoded_on(loader, device: str) -> Iterator[dict]:
    """The device's share, as the module runs it after the transfer: decode and crop (decode_on=device) or
    resize (resize_on=device), then normalise."""
    import torch

    from clip_pl.data.device_decode import decode_batch
    from clip_pl.data.device_resize import resize_batch
    from clip_pl.pixels import normalize

    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch = decode_batch(batch) if "jpeg" in batch else resize_batch(batch)
        batch["image"] = normalize(batch["image"])
        synchronize(device)
        yield batch


def run_loader(args) -> dict[str, Any]:
    import torch

    from benchmarks.loader_bench import _measure
    from clip_pl.data import WebDatasetDataModule

    torch.set_num_threads(1)  # the workers decode; the main process only collects batches
    work = Path(tempfile.mkdtemp(prefix="gpu_check_shards_"))
    try:
        started = time.perf_counter()
        shards = write_jpeg_shards(work, args.images, args.batch_size, tuple(args.image_px))
        written_s = time.perf_counter() - started
        data = WebDatasetDataModule(
            str(shards),
            batch_size=args.batch_size,
            num_workers=args.workers,
            image_size=args.image_size,
            prefetch_factor=2,
            decode_on=args.decode_on,
            resize_on=args.resize_on,
        )
        data.setup("fit")
        loader = data.train_dataloader()
        if args.decode_on == "device" or args.resize_on == "device":
            loader = decoded_on(loader, args.device)
        measurement = _measure(loader, args.workers, epochs=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "workers": args.workers,
        "images": args.images,
        "image_px": list(args.image_px),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "decode_on": args.decode_on,
        "resize_on": args.resize_on,
        "write_s": written_s,
        **measurement,
    }


# =============================================================================== the machine


def run_env(args) -> dict[str, Any]:
    import importlib.metadata as metadata
    import platform

    import torch

    versions = {}
    for name in ("torch", "lightning", "open_clip_torch", "hydra-core", "webdataset", "deepspeed", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
    }
    # The practical ceiling: one large bf16 matmul, the mean of 10 after 3 warm-ups.
    n = 8192 if args.device == "cuda" else 256
    a = torch.randn(n, n, device=args.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=args.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = mark(args.device)
    for _ in range(10):
        a @ b
    env["bf16_matmul_tflops"] = 10 * 2 * n**3 / (mark(args.device) - start) / 1e12
    env["bf16_matmul_n"] = n
    return env


# =============================================================================== all runs, and the report


@dataclasses.dataclass
class Run:
    name: str
    argv: list[str]
    timeout_s: float


def plan_runs(plan: Plan, device: str) -> list[Run]:
    """In order of importance: if the budget runs out, what is skipped is what matters least."""
    common = [
        "--device",
        device,
        "--precision",
        plan.precision,
        "--batch-size",
        str(plan.batch_size),
        "--warmup",
        str(plan.warmup),
        "--steps",
        str(plan.steps),
        "--profile-steps",
        str(plan.profile_steps),
        "--n-batches",
        str(plan.n_batches),
    ]
    t = plan.timeouts
    runs = [Run("env", ["env", "--device", device], t["env"])]
    for model in plan.models:
        for side in ("open_clip", "clip_pl"):
            runs.append(Run(f"{side}-{model}", ["side", "--side", side, "--model", model, *common], t["side"]))
    loader = [
        "loader",
        "--workers",
        str(plan.loader_workers),
        "--images",
        str(plan.loader_images),
        "--image-px",
        *map(str, plan.loader_image_px),
        "--image-size",
        str(plan.loader_image_size),
        "--batch-size",
        str(plan.loader_batch_size),
    ]
    runs.append(Run("loader", loader, t["loader"]))
    for variant, timeout in (("grad_cache4", t["side"]), ("deepspeed2", t["deepspeed"]), ("compile", t["compile"])):
        backend = ["--compile-backend", plan.compile_backend] if variant == "compile" and plan.compile_backend else []
        runs.append(
            Run(
                f"clip_pl-{plan.variant_model}-{variant}",
                ["side", "--side", "clip_pl", "--model", plan.variant_model, "--variant", variant, *backend, *common],
                timeout,
            )
        )
    # Last: the newest measurement must not push the older ones out of the budget.
    runs.append(Run("loader_device", [*loader, "--decode-on", "device", "--device", device], t["loader"]))
    runs.append(Run("loader_resize_device", [*loader, "--resize-on", "device", "--device", device], t["loader"]))
    return runs


def execute(run: Run, result: Path, log, timeout_s: float) -> dict[str, Any]:
    """One run in a fresh process (its own session, so a timeout ends its loader workers too)."""
    log.write(f"\n===== {run.name}: {' '.join(run.argv)} (timeout {timeout_s:.0f} s)\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu_check", *run.argv, "--result", str(result)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        rc = process.wait(timeout=timeout_s)
        status = "ok" if rc == 0 and result.exists() else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        rc, status = process.wait(), "timeout"
    seconds = time.monotonic() - started
    log.write(f"===== {run.name}: {status} (exit {rc}) after {seconds:.1f} s\n")
    log.flush()
    return {"status": status, "exit_code": rc, "seconds": round(seconds, 1), "timeout_s": round(timeout_s)}


def max_relative_difference(a: list[float], b: list[float], steps: int) -> float:
    n = min(len(a), len(b), steps)
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n]))


def build_report(plan: Plan, device: str, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "device": device,
        "plan": dataclasses.asdict(plan),
        "runs": runs,
        "comparisons": [],
        "trajectories": [],
        "problems": [],
    }
    problems = report["problems"]
    for name, run in runs.items():
        if run["status"] != "ok":
            problems.append(f"{name}: {run['status']}")

    def data(name):
        return runs.get(name, {}).get("result")

    for model in plan.models:
        ours, theirs = data(f"clip_pl-{model}"), data(f"open_clip-{model}")
        if not (ours and theirs):
            continue
        if ours["weights_fingerprint"] != theirs["weights_fingerprint"]:
            problems.append(f"{model}: the two sides started from different weights")
        if ours["no_decay_parameters"] != theirs["no_decay_parameters"]:
            problems.append(f"{model}: the weight-decay groups differ")
        difference = max_relative_difference(ours["losses"], theirs["losses"], plan.trajectory_steps)
        steps = min(len(ours["losses"]), len(theirs["losses"]), plan.trajectory_steps)
        report["trajectories"].append(
            {
                "model": model,
                "compared": "clip_pl vs open_clip",
                "steps": steps,
                "max_relative_difference": difference,
                "tolerance": BF16_TOLERANCE,
                "agree": difference <= BF16_TOLERANCE,
                "clip_pl": ours["losses"][:steps],
                "open_clip": theirs["losses"][:steps],
            }
        )
        rows = [("open_clip", theirs), ("clip_pl", ours)]
        if model == plan.variant_model:
            rows += [(f"clip_pl {v}", data(f"clip_pl-{model}-{v}")) for v in VARIANTS if data(f"clip_pl-{model}-{v}")]
        for label, result in rows:
            report["comparisons"].append(
                {
                    "model": model,
                    "run": label,
                    "samples_per_s": result["samples_per_s"],
                    "step_ms": result["step_ms"],
                    "mfu": result["mfu"],
                    "tflops": result["tflops"],
                    "peak_memory_gb": result.get("peak_memory_gb", result.get("peak_rss_gb")),
                    "vs_open_clip": result["samples_per_s"] / theirs["samples_per_s"],
                    "gpu_busy_share": (result.get("profile") or {}).get("gpu_busy_share"),
                    "data_wait_share": (result.get("telemetry") or {}).get("perf/data_wait_share"),
                }
            )
    for variant in VARIANTS:  # each variant trains like the plain run (the same model, same steps)
        base, other = data(f"clip_pl-{plan.variant_model}"), data(f"clip_pl-{plan.variant_model}-{variant}")
        if base and other:
            difference = max_relative_difference(other["losses"], base["losses"], plan.trajectory_steps)
            report["trajectories"].append(
                {
                    "model": plan.variant_model,
                    "compared": f"clip_pl {variant} vs clip_pl",
                    "max_relative_difference": difference,
                    "tolerance": BF16_TOLERANCE,
                    "agree": difference <= BF16_TOLERANCE,
                }
            )
    for trajectory in report["trajectories"]:
        if not trajectory["agree"]:
            problems.append(
                f"{trajectory['model']}: {trajectory['compared']} loss trajectories differ by "
                f"{trajectory['max_relative_difference']:.2e} > {BF16_TOLERANCE:.2e}"
            )
    report["goals"] = goals(plan, report, data)
    report["ok"] = not problems
    return report


def goals(plan: Plan, report: dict[str, Any], data) -> list[dict[str, Any]]:
    """The targets of issue 12, each with the figure measured against it (reported, not asserted)."""
    found = []
    rows = {(c["model"], c["run"]): c for c in report["comparisons"]}
    model = plan.variant_model
    for run, target in (("clip_pl", 1.0), ("clip_pl compile", 1.3)):
        if (model, run) in rows:
            value = rows[(model, run)]["vs_open_clip"]
            found.append(
                {"goal": f"{run} / open_clip samples/s on {model} >= {target}", "value": value, "met": value >= target}
            )
    for name, what in (
        ("loader", "loader"),
        ("loader_device", "decode_on=device loader"),
        ("loader_resize_device", "resize_on=device loader"),
    ):
        loader = data(name)
        if not loader:
            continue
        for (row_model, run), row in rows.items():
            if run == "clip_pl":
                found.append(
                    {
                        "goal": f"{what} samples/s >= clip_pl's GPU samples/s on {row_model}",
                        "value": loader["samples_per_s"] / row["samples_per_s"],
                        "met": loader["samples_per_s"] >= row["samples_per_s"],
                    }
                )
    return found


def markdown(report: dict[str, Any]) -> str:
    env = report["runs"].get("env", {}).get("result") or {}
    lines = [
        f"Device: {env.get('device_name', '?')}; bf16 matmul {env.get('bf16_matmul_tflops', float('nan')):.0f} "
        f"TFLOP/s (n={env.get('bf16_matmul_n')}); versions {env.get('versions')}",
        "",
        "| model | run | samples/s | step ms | MFU | TFLOP/s | peak mem GB | vs open_clip | GPU busy | data wait |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for c in report["comparisons"]:
        lines.append(
            f"| {c['model']} | {c['run']} | {c['samples_per_s']:.1f} | {c['step_ms']:.1f} | "
            f"{fmt(c['mfu'], '.1%')} | {c['tflops']:.1f} | {fmt(c['peak_memory_gb'], '.2f')} | "
            f"{c['vs_open_clip']:.2f} | {fmt(c['gpu_busy_share'], '.0%')} | "
            f"{fmt(c['data_wait_share'], '.1%')} |"
        )
    lines.append("")
    for t in report["trajectories"]:
        lines.append(
            f"- loss trajectory, {t['model']}, {t['compared']}: max relative difference "
            f"{t['max_relative_difference']:.2e} (tolerance {t['tolerance']:.2e}): "
            f"{'agree' if t['agree'] else 'DIFFER'}"
        )
    for name in ("loader", "loader_device", "loader_resize_device"):
        loader = report["runs"].get(name, {}).get("result")
        if loader:
            lines.append(
                f"- {name} alone (decode_on={loader.get('decode_on', 'cpu')}, "
                f"resize_on={loader.get('resize_on')}): {loader['samples_per_s']:.0f} "
                f"samples/s ({loader['workers']} workers, {loader['image_px'][0]}-{loader['image_px'][1]} px "
                f"JPEGs at {loader['image_size']} px, batch {loader['batch_size']}, {loader['cpu_count']} cores)"
            )
    for g in report["goals"]:
        lines.append(f"- goal: {g['goal']}: {g['value']:.2f} ({'met' if g['met'] else 'NOT met'})")
    for name, run in report["runs"].items():
        lines.append(f"- run {name}: {run['status']} in {run['seconds']} s (timeout {run['timeout_s']} s)")
    for problem in report["problems"]:
        lines.append(f"- PROBLEM: {problem}")
    return "\n".join(lines) + "\n"


def run_all(args) -> int:
    plan = PLANS[args.device]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    deadline = time.monotonic() + (args.budget_s or plan.budget_s)
    runs: dict[str, dict[str, Any]] = {}
    try:
        with open(out / "gpu_check.log", "a") as log:
            for run in plan_runs(plan, args.device):
                remaining = deadline - time.monotonic()
                if remaining < MIN_RUN_S:
                    runs[run.name] = {
                        "status": "skipped",
                        "exit_code": None,
                        "seconds": 0,
                        "timeout_s": 0,
                        "reason": f"{remaining:.0f} s of the budget left",
                    }
                    continue
                result = work / f"{run.name}.json"
                runs[run.name] = execute(run, result, log, min(run.timeout_s, remaining))
                if result.exists():
                    runs[run.name]["result"] = json.loads(result.read_text())
        report = build_report(plan, args.device, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    with open(out / "profiles.txt", "w") as handle:
        for name, run in runs.items():
            profile = (run.get("result") or {}).get("profile")
            if profile:
                handle.write(
                    f"===== {name}: {profile['steps']} steps, {profile['wall_ms']:.1f} ms, GPU busy "
                    f"{profile['gpu_busy_share']}\n{profile['table']}\n"
                )
    print(markdown(report))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    every = commands.add_parser("all", help="every run, then the report")
    every.add_argument("--device", choices=sorted(PLANS), default="cuda")
    every.add_argument("--out", required=True, help="folder for results.json, results.md, profiles.txt, the log")
    every.add_argument("--budget-s", type=float, default=None, help="overall budget (default: the plan's)")
    side = commands.add_parser("side", help="one training run")
    side.add_argument("--side", choices=["clip_pl", "open_clip"], required=True)
    side.add_argument("--model", default="tiny")
    side.add_argument("--variant", choices=["none", *VARIANTS], default="none")
    side.add_argument("--device", choices=sorted(PLANS), default="cpu")
    side.add_argument("--precision", default="bf16-mixed")
    side.add_argument("--batch-size", type=int, default=16)
    side.add_argument("--warmup", type=int, default=1)
    side.add_argument("--steps", type=int, default=3)
    side.add_argument("--profile-steps", type=int, default=1)
    side.add_argument("--n-batches", type=int, default=2)
    side.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend for model.compile (default: inductor); the CPU dry-run uses aot_eager",
    )
    loader = commands.add_parser("loader", help="the loader alone")
    loader.add_argument("--workers", type=int, default=2)
    loader.add_argument("--images", type=int, default=64)
    loader.add_argument("--image-px", type=int, nargs=2, default=[64, 96])
    loader.add_argument("--image-size", type=int, default=64)
    loader.add_argument("--batch-size", type=int, default=8)
    loader.add_argument("--decode-on", choices=["cpu", "device"], default="cpu", help="data.decode_on")
    loader.add_argument("--resize-on", choices=["worker", "device"], default=None, help="data.resize_on")
    loader.add_argument(
        "--device",
        choices=sorted(PLANS),
        default="cpu",
        help="where decode_on=device decodes, resize_on=device resizes",
    )
    env = commands.add_parser("env", help="device, versions, bf16 matmul TFLOP/s")
    env.add_argument("--device", choices=sorted(PLANS), default="cpu")
    for command in (side, loader, env):
        command.add_argument("--result", type=Path, required=True, help="where the run's JSON goes")
    args = parser.parse_args(argv)
    if args.command == "all":
        return run_all(args)
    result = {"side": run_side, "loader": run_loader, "env": run_env}[args.command](args)
    args.result.write_text(json.dumps(result))
    print(
        f"RESULT {args.command}: "
        + json.dumps({k: v for k, v in result.items() if k not in ("profile", "losses", "no_decay_parameters")})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
