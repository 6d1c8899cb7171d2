"""Train-step throughput: clip_pl's Lightning loop vs OpenCLIP's own ``train_one_epoch``.

    python -m benchmarks.train_throughput                      # tiny model, CPU, batch 64
    python -m benchmarks.train_throughput --model vit_b32 --batch-size 256 --precision bf16-mixed --steps 100 \
        --accelerator gpu --strategy deepspeed_stage_2    # on a GPU; the prepared GPU check is benchmarks/gpu.sh

Same architecture, same initial weights, same synthetic batches, same AdamW, one process each,
run one after the other in fresh subprocesses. clip_pl runs through its real entry path (Hydra
config → ``build_module``/``build_trainer``, the DDP strategy, telemetry and checkpoint callbacks);
OpenCLIP through ``open_clip_train.train.train_one_epoch``. Both are timed the same way: the wall
time between fetching batch ``warmup`` and fetching the last batch, i.e. whole steps only.
Each side runs ``--repeats`` times, alternating; prints a JSON line with each side's median
samples/s (and every run's), and the ratio of the medians clip_pl / OpenCLIP (target ≥ 1.0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class TimedLoader:
    """Wraps a DataLoader and records when each batch was handed out."""

    def __init__(self, loader, as_tuple: bool):
        self.loader, self.as_tuple, self.times = loader, as_tuple, []
        self.num_batches, self.num_samples = len(loader), len(loader) * loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.times.append(time.perf_counter())
            if self.as_tuple:  # OpenCLIP's loop takes normalised float images; clip_pl's module normalises uint8 itself
                from clip_pl.pixels import normalize

                yield normalize(batch["image"]), batch["text"]
            else:
                yield batch


def samples_per_s(times: list[float], batch_size: int, warmup: int) -> float:
    return (len(times) - 1 - warmup) * batch_size / (times[-1] - times[warmup])


def compose(args, tmp: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from clip_pl.config_dir import config_dir

    overrides = [
        f"model={args.model}",
        "data=synthetic",
        f"data.batch_size={args.batch_size}",
        f"data.num_samples={args.batch_size * args.steps}",
        f"trainer.max_steps={args.steps}",
        f"trainer.precision={args.precision}",
        f"trainer.accelerator={args.accelerator}",
        "logger=csv",
        "scheduler.warmup_steps=1",
        f"paths.root_dir={tmp}",
        "run_name=bench",
        "callbacks.progress_bar=null",
        "callbacks.checkpoint.every_n_train_steps=0",
        f"strategy={args.strategy}",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def run_clip_pl(args) -> float:
    import tempfile

    import lightning as L

    from clip_pl.assembly import build_module, build_trainer
    from clip_pl.config_checks import prepare_config
    from clip_pl.data.synthetic import SyntheticDataModule

    tmp = tempfile.mkdtemp()
    cfg = prepare_config(compose(args, tmp))
    L.seed_everything(0)
    module = build_module(cfg)
    loader_holder = {}

    class TimedData(SyntheticDataModule):
        def train_dataloader(self):
            loader_holder["loader"] = TimedLoader(super().train_dataloader(), as_tuple=False)
            return loader_holder["loader"]

    data = TimedData(
        batch_size=args.batch_size,
        num_samples=args.batch_size * args.steps,
        image_size=cfg.model.image_size,
        context_length=cfg.model.context_length,
    )
    trainer = build_trainer(cfg, Path(tmp) / "runs" / "bench")
    trainer.fit(module, datamodule=data)
    return samples_per_s(loader_holder["loader"].times, args.batch_size, args.warmup), module.model_config


def run_open_clip(args) -> float:
    import tempfile

    import open_clip
    from open_clip_train.data import DataInfo
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from clip_pl.data.synthetic import SyntheticDataModule

    cfg = compose(args, tempfile.mkdtemp())
    from clip_pl.assembly import build_module

    torch.manual_seed(0)
    model = build_module(cfg).model  # the same open_clip CLIP, the same initialisation
    model.output_dict = True
    precision = {"bf16-mixed": "amp_bf16", "16-mixed": "amp", "32": "fp32"}[args.precision]
    oc_args = parse_args(
        [
            "--batch-size",
            str(args.batch_size),
            "--precision",
            precision,
            "--lr",
            "5e-4",
            "--wd",
            "0.2",
            "--warmup",
            "1",
            "--log-every-n-steps",
            str(10**9),
            "--local-loss",
            "--gather-with-grad",
        ]
    )
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    oc_args.device, oc_args.world_size, oc_args.rank, oc_args.local_rank = device, 1, 0, 0
    oc_args.distributed, oc_args.wandb, oc_args.distill, oc_args.model = False, False, False, "tiny"
    model.to(device)
    decay = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n)
    ]
    no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    optimizer = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scaler = torch.amp.GradScaler() if precision == "amp" else None
    data = SyntheticDataModule(
        batch_size=args.batch_size,
        num_samples=args.batch_size * args.steps,
        image_size=cfg.model.image_size,
        context_length=cfg.model.context_length,
    )
    loader = TimedLoader(data.train_dataloader(), as_tuple=True)
    scheduler = cosine_lr(optimizer, 5e-4, 1, args.steps)
    loss = open_clip.create_loss(oc_args)
    train_one_epoch(model, {"train": DataInfo(loader)}, loss, 0, optimizer, scaler, scheduler, None, oc_args)
    if device == "cuda":
        torch.cuda.synchronize()
    return samples_per_s(loader.times, args.batch_size, args.warmup), build_module(cfg).model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="32")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--strategy", default="ddp", help="clip_pl's strategy (clip_pl/conf/strategy), e.g. deepspeed_stage_2"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the median is reported")
    parser.add_argument("--only", choices=["clip_pl", "open_clip"], help="internal: run one side in this process")
    args = parser.parse_args()
    if args.steps < args.warmup + 2:  # the timed window runs from batch `warmup` to the last batch
        parser.error(
            f"--steps {args.steps} must be at least --warmup + 2 = {args.warmup + 2}: no whole step would be timed"
        )
    if args.only:
        fn = run_clip_pl if args.only == "clip_pl" else run_open_clip
        throughput, model_config = fn(args)
        result = {args.only: throughput}
        if args.accelerator == "gpu":  # the same MFU formula and memory probe for both sides
            from clip_pl.callbacks.telemetry import peak_flops_per_device, train_flops_per_sample

            peak = peak_flops_per_device(torch.cuda.get_device_name(), args.precision)
            flops = train_flops_per_sample(model_config)["train"]
            result[f"{args.only}_mfu"] = throughput * flops / peak if peak else None
            result[f"{args.only}_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print("RESULT", json.dumps(result), flush=True)
        return
    runs: dict[str, list[dict]] = {"open_clip": [], "clip_pl": []}
    for _ in range(args.repeats):  # alternate the sides, so slow drifts of the machine hit both
        for side in ("open_clip", "clip_pl"):  # fresh processes: neither inherits the other's caches
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.train_throughput", *sys.argv[1:], "--only", side],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                sys.exit(f"{side} failed:\n{out.stderr[-4000:]}")
            runs[side].append(json.loads(lines[-1][len("RESULT ") :]))
    results = {}
    for side, side_runs in runs.items():  # the median run of each side (by samples/s)
        results.update(sorted(side_runs, key=lambda r: r[side])[len(side_runs) // 2])
        results[f"{side}_all"] = [round(r[side], 1) for r in side_runs]
    results.update(
        model=args.model,
        batch_size=args.batch_size,
        steps=args.steps,
        precision=args.precision,
        strategy=args.strategy,
        device=torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu",
        ratio=results["clip_pl"] / results["open_clip"],
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
