"""The numbers to know before submitting a 256-GPU job (32 nodes × 8), printed as markdown.

    python -m benchmarks.scale_model            # the tables of README.md "Running at 256 GPUs"

Parameter counts come from open_clip's configs (built on the meta device, nothing downloaded);
everything else is arithmetic on the cited anchors below. No timing is measured here except the
loader's samples/s per core, which comes from benchmarks/RESULTS.md (this machine).
"""

from __future__ import annotations

GPUS, PER_NODE = 256, 8
GLOBAL_BATCHES = (32_768, 65_536)

# Published anchors (A100 40 GB, OpenCLIP on LAION-400M, 32 epochs ≈ 12.8 B samples; wall time
# includes evaluation and checkpoints, so these per-GPU rates are lower bounds):
# open_clip docs/PRETRAINED.md: B/32 128 GPUs ~36 h; B/16 176 GPUs ~61 h; L/14 400 GPUs ~127 h
# (grad checkpointing on).
SAMPLES_SEEN = 32 * 400e6
ANCHORS = {"ViT-B-32": (128, 36), "ViT-B-16": (176, 61), "ViT-L-14": (400, 127)}
# NVIDIA NeMo CLIP performance page: g/14 on 1 → 16 DGX nodes, 559 → 8 633 samples/s on A100
# (15.43× on 16×: 96.4 %), 935 → 13 829 on H100 (14.8×: 92.5 %); H100/A100 on one node 935/559.
EFFICIENCY = {"A100": 15.43 / 16, "H100": 14.8 / 16}
H100_OVER_A100 = 935 / 559
# Inter-node bandwidth per GPU: one InfiniBand port per GPU, HDR 200 Gb/s (DGX A100) or NDR 400 Gb/s
# (DGX H100, ConnectX-7): 25 / 50 GB/s each way.
IB_BYTES_PER_S = {"A100": 25e9, "H100": 50e9}
# Loader, measured here (benchmarks/RESULTS.md): samples/s per worker process (≈ one core).
LOADER_PER_CORE = {"224 px from 512–800 px JPEGs": 120.4, "demo shards, 64 px": 1044.2}


def model_sizes() -> dict[str, tuple[int, int]]:
    import open_clip
    import torch

    sizes = {}
    for name in ANCHORS:
        cfg = open_clip.get_model_config(name)
        with torch.device("meta"):
            model = open_clip.CLIP(**cfg)
        sizes[name] = (sum(p.numel() for p in model.parameters()), int(cfg["embed_dim"]))
    return sizes


def mb(x: float) -> str:
    return f"{x / 1e6:,.0f} MB" if x < 1e9 else f"{x / 1e9:,.2f} GB"


def main() -> None:
    sizes = model_sizes()
    print(
        "| model | params | global batch | per GPU b | features all-gathered (bf16, per rank, fwd; same again bwd) "
        "| gradients all-reduced (fp32; ring traffic per rank) | logits per rank (b×N fp32, each direction) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (params, dim) in sizes.items():
        for n in GLOBAL_BATCHES:
            b = n // GPUS
            feats = 2 * (n - b) * dim * 2
            grads = params * 4
            ring = 2 * (GPUS - 1) / GPUS * grads
            print(
                f"| {name} | {params / 1e6:.1f} M | {n:,} | {b} | {mb(feats)} | {mb(grads)}; {mb(ring)} "
                f"(≥ {ring / IB_BYTES_PER_S['A100'] * 1e3:.0f} ms A100 / {ring / IB_BYTES_PER_S['H100'] * 1e3:.0f} ms H100) "
                f"| {mb(b * n * 4)} |"
            )
    print()
    print(
        "| model | anchor samples/s per A100 | per node A100 / H100 | loader cores per node at 120 / 1044 samples/s/core "
        "| step time at 32k, A100 / H100 | at 64k |"
    )
    print("|---|---|---|---|---|---|")
    for name, (gpus, hours) in ANCHORS.items():
        per_gpu = SAMPLES_SEEN / (hours * 3600 * gpus)
        node_a, node_h = per_gpu * PER_NODE, per_gpu * PER_NODE * H100_OVER_A100
        cores = [f"{node_a / v:.0f}–{node_h / v:.0f}" for v in LOADER_PER_CORE.values()]
        steps = []
        for n in GLOBAL_BATCHES:
            t_a = n / (per_gpu * GPUS * EFFICIENCY["A100"])
            t_h = n / (per_gpu * H100_OVER_A100 * GPUS * EFFICIENCY["H100"])
            steps.append(f"{t_a:.2f} s / {t_h:.2f} s")
        print(
            f"| {name} | {per_gpu:,.0f} | {node_a:,.0f} / {node_h:,.0f} | {cores[0]} / {cores[1]} | {steps[0]} | {steps[1]} |"
        )
    print()
    print(
        f"weak-scaling efficiency used: A100 {EFFICIENCY['A100']:.1%}, H100 {EFFICIENCY['H100']:.1%} (16 nodes, NeMo g/14)"
    )


if __name__ == "__main__":
    main()
