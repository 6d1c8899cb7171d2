"""Why ``model.grad_cache_chunks`` matters: peak memory of one training step vs chunks.

    python -m benchmarks.grad_cache_memory                          # ViT-B/32, batch 64, CPU
    python -m benchmarks.grad_cache_memory --model vit_b16 --batch-size 512 --device cuda

Each configuration runs one forward + backward of the same device batch in a fresh subprocess;
the figure is the step's peak memory above what the process held before it (CPU: peak RSS from
getrusage; CUDA: torch.cuda.max_memory_allocated). The gradients are identical for every chunk
count (tests/test_module.py checks it); only the activation memory changes: with k chunks the
towers' activations are those of batch/k, while the loss still contrasts the whole global batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def peak_step_memory_mb(model: str, batch_size: int, chunks: int, device: str) -> float:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from clip_pl.config_dir import config_dir
    from clip_pl.loss import ClipLoss

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        model_cfg = compose("train", overrides=[f"model={model}", f"model.grad_cache_chunks={chunks}"]).model
    # conf/model's _target_ (CLIPModule.from_options, partial): what clip_pl.train builds.
    module = instantiate(model_cfg)(loss=ClipLoss(), optimizer=functools.partial(torch.optim.AdamW)).to(device)
    size, length = model_cfg["image_size"], model_cfg["context_length"]
    batch = {
        "image": torch.randn(batch_size, 3, size, size, device=device),
        "text": torch.randint(1, 49000, (batch_size, length), device=device),
    }
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    module.contrastive_loss(batch).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", type=int, help="internal: measure one chunk count in this process")
    args = parser.parse_args()
    if args.only:
        print("RESULT", peak_step_memory_mb(args.model, args.batch_size, args.only, args.device), flush=True)
        return
    results = {}
    for chunks in args.chunks:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.grad_cache_memory",
                "--model",
                args.model,
                "--batch-size",
                str(args.batch_size),
                "--device",
                args.device,
                "--only",
                str(chunks),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(out.stderr[-3000:])
        results[chunks] = float(line[-1].split()[1])
    print(
        json.dumps(
            {
                "model": args.model,
                "batch_size": args.batch_size,
                "device": args.device,
                "peak_step_memory_mb_by_chunks": results,
                "ratio_to_unchunked": {k: v / results[args.chunks[0]] for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
