"""Memory per rank of every strategy, as a ratio against DDP measured in the same run.

    python -m benchmarks.strategy_memory                      # ViT-B/32, 2 CPU processes, fp32
    python -m benchmarks.strategy_memory --model tiny --steps 2 --strategies ddp fsdp
    python -m benchmarks.strategy_memory --strategies ddp ddp_image_locked   # what locking a tower saves

Each strategy trains ``--steps`` steps through ``python -m clip_pl.train`` on 2 CPU processes
(gloo, synthetic data). A callback records, on every rank, the peak resident set size of the
process and the bytes of model state the rank holds after the last step: its parameters (local
shards under FSDP), gradients and optimizer state. On CPU, offloading moves nothing between
devices, so "offload" rows show what stays in the training processes' memory all the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = [
    "ddp",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_3",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3_offload",
    "fsdp",
]
# Rows that change the model rather than the strategy, measured the same way against DDP: what
# locking a tower (clip_pl/towers.py) saves at the step's peak, not only in held state.
VARIANTS = {
    "ddp_image_locked": ("ddp", ["model.lock_image=true"]),
    "ddp_text_locked": ("ddp", ["model.lock_text=true"]),
}


def _local_bytes(tensor: torch.Tensor) -> int:
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


def _unique_storages_bytes(tensors) -> int:
    """Bytes of distinct storages (DeepSpeed views its parameters into flat buffers: count each once)."""
    seen, total = set(), 0
    for tensor in tensors:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class MemoryReport(L.Callback):
    """Writes ``memory_rank<r>.json``: peak RSS and the model state this rank holds."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        params = [p for p in pl_module.parameters()]
        grads = [p.grad for p in params if p.grad is not None]
        optimizer = trainer.optimizers[0]
        inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the client optimizer
        state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        # ZeRO keeps fp32 partitions and gradient partitions in its own flat buffers.
        flat = [
            t
            for name in (
                "single_partition_of_fp32_groups",
                "fp32_partitioned_groups_flat",
                "averaged_gradients",
                "fp16_partitioned_groups_flat",
            )
            for t in _flatten(getattr(optimizer, name, None))
        ]
        report = {
            "rank": trainer.global_rank,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "model_state_mb": _unique_storages_bytes([*params, *grads, *state, *flat]) / 2**20,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"memory_rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []


def measure(row: str, model: str, steps: int, batch_size: int, root: Path) -> dict:
    strategy, extra = VARIANTS.get(row, (row, []))
    out_dir = root / f"memory-{row}"
    command = [
        sys.executable,
        "-m",
        "clip_pl.train",
        f"model={model}",
        "data=synthetic",
        "trainer=cpu",
        "trainer.devices=2",
        f"data.batch_size={batch_size}",
        "global_batch_size=null",
        f"trainer.max_steps={steps}",
        "scheduler.warmup_steps=1",
        f"strategy={strategy}",
        f"paths.root_dir={root}",
        f"run_name={row}",
        "callbacks.checkpoint.every_n_train_steps=0",
        "callbacks.checkpoint.save_last=false",
        "callbacks.progress_bar=null",
        "+callbacks.memory._target_=benchmarks.strategy_memory.MemoryReport",
        f"+callbacks.memory.out_dir={out_dir}",
        *extra,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{row} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("memory_rank*.json"))]
    return {
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "model_state_mb": max(r["model_state_mb"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_b32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=STRATEGIES,
        choices=[*STRATEGIES, *VARIANTS],
        help="rows to measure (strategies, or the model variants in VARIANTS)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: measure(s, args.model, args.steps, args.batch_size, Path(tmp)) for s in args.strategies}
    ddp = results.get("ddp")
    print(
        f"model={args.model}, 2 CPU processes, fp32, batch {args.batch_size} per rank, {args.steps} steps; "
        f"per rank (the larger of the two ranks)"
    )
    print(f"{'strategy':28s} {'peak RSS MB':>12s} {'vs DDP':>7s} {'model state MB':>15s} {'vs DDP':>7s}")
    for strategy, r in results.items():
        rss = f"{r['peak_rss_mb'] / ddp['peak_rss_mb']:.2f}" if ddp else "-"
        state = f"{r['model_state_mb'] / ddp['model_state_mb']:.2f}" if ddp else "-"
        print(f"{strategy:28s} {r['peak_rss_mb']:12.0f} {rss:>7s} {r['model_state_mb']:15.0f} {state:>7s}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
