"""Evaluation suite wall time vs clip_benchmark's own functions, on the same tasks, same model, same process.

    python -m benchmarks.eval_suite                     # drawn shape tasks, a small random ViT, CPU
    python -m benchmarks.eval_suite --per-class 4 --repeats 1 --json /tmp/eval_suite.json

Tasks: the drawn ones of ``python -m clip_pl.eval.demo_tasks`` (12 colour × shape classes): zero-shot
classification on an ImageFolder, image↔text retrieval on caption shards, a linear probe (train/test
folders, weight decay picked on a held-out fifth). Each side reads the files itself, encodes and scores:

* clip_pl: ``clip_pl.eval.suite.evaluate_tasks`` (one task list);
* clip_benchmark 1.6.2: ``zero_shot_classifier`` + ``run_classification`` (its ``accuracy`` helper
  fails under NumPy 2, so top-k is counted from its logits), ``zeroshot_retrieval.evaluate`` on a
  Dataset over the same shards' images and captions, and for the probe its ``Featurizer`` then
  ``find_peak`` (7 coarse + spans 8→1) and ``train``/``infer``, with ``.cuda()`` made the identity
  (its probe hard-codes CUDA) — the chain its ``evaluate`` runs on cached features.

Both sides use the same loaders' batch size, num_workers=0, fp32, and the same torch thread count.
Reported: best-of-``--repeats`` seconds per task, interleaved, and the ratio clip_benchmark / clip_pl.
It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ARCH = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
BATCH = 64


class _CaptionShards(Dataset):
    """(image, [captions]) per sample of caption shards, decoded on access: clip_benchmark's retrieval input."""

    def __init__(self, directory: Path, transform):
        self.items: list[tuple[bytes, list[str]]] = []
        for path in sorted(directory.glob("*.tar")):
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.rsplit(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(member).read()
            self.items += [(m["png"], m["txt"].decode().splitlines()) for m in members.values()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        data, captions = self.items[i]
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB")), captions


def clip_benchmark_weight_decay(train_loader, val_loader, dim: int, classes: int, seed: int) -> float:
    """clip_benchmark's weight-decay search, in the order its linear_probe.evaluate runs it: 7 values on
    a log grid of 97 from 1e-6 to 1e2, then a binary refinement around the best (lr 0.1, 10 epochs)."""
    from clip_benchmark.metrics import linear_probe

    args = (train_loader, val_loader, dim, classes, 0.1, 10, False, "cpu", False, seed)
    wds = np.logspace(-6, 2, num=97).tolist()
    peak = linear_probe.find_peak(wds, [i for i, v in enumerate(wds) if v in np.logspace(-6, 2, num=7).tolist()], *args)
    span = 8
    while span > 0:
        peak = linear_probe.find_peak(wds, [max(peak - span, 0), peak, min(peak + span, len(wds) - 1)], *args)
        span //= 2
    return wds[peak]


def clip_benchmark_tasks(model, transform, tokenizer, root: Path, classnames, templates) -> dict[str, float]:
    """Seconds per task for clip_benchmark's functions."""
    from clip_benchmark.metrics import linear_probe, zeroshot_classification, zeroshot_retrieval
    from sklearn.metrics import balanced_accuracy_score
    from torchvision.datasets import ImageFolder

    seconds = {}
    start = time.perf_counter()
    folder = DataLoader(ImageFolder(str(root / "shapes" / "test"), transform=transform), batch_size=BATCH)
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, classnames, [t.replace("{}", "{c}") for t in templates], "cpu", amp=False
    )
    logits, target = zeroshot_classification.run_classification(model, classifier, folder, "cpu", amp=False)
    (logits.topk(5, 1).indices == target[:, None]).any(1).float().mean()
    balanced_accuracy_score(target, logits.argmax(1))
    seconds["shapes"] = time.perf_counter() - start

    start = time.perf_counter()
    captions = DataLoader(
        _CaptionShards(root / "shape_captions", transform),
        batch_size=BATCH,
        collate_fn=lambda b: (torch.stack([x[0] for x in b]), [x[1] for x in b]),
    )
    zeroshot_retrieval.evaluate(model, captions, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    seconds["shape_captions"] = time.perf_counter() - start

    start = time.perf_counter()
    real_cuda, real_accuracy = (torch.nn.Module.cuda, torch.Tensor.cuda), linear_probe.accuracy
    torch.nn.Module.cuda = lambda self, *a, **k: self  # its probe hard-codes CUDA; the arithmetic is unchanged
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        featurizer = linear_probe.Featurizer(model)
        features = {}
        for split in ("train", "test"):
            loader = DataLoader(ImageFolder(str(root / "shapes" / split), transform=transform), batch_size=BATCH)
            with torch.no_grad():
                pairs = [(featurizer(x), y) for x, y in loader]
            features[split] = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
        train_set, val_set = torch.utils.data.random_split(linear_probe.FeatureDataset(*features["train"]), [0.8, 0.2])
        train_loader = DataLoader(train_set, batch_size=BATCH, shuffle=True)
        val_loader = DataLoader(val_set, batch_size=BATCH, shuffle=True)
        classes = int(features["train"][1].max()) + 1
        linear_probe.accuracy = _accuracy  # NumPy 2 refuses its float() of a 1-element array
        weight_decay = clip_benchmark_weight_decay(train_loader, val_loader, features["train"][0].shape[1], classes, 0)
        final = linear_probe.train(
            DataLoader(linear_probe.FeatureDataset(*features["train"]), batch_size=BATCH, shuffle=True),
            features["train"][0].shape[1],
            classes,
            weight_decay,
            0.1,
            10,
            False,
            "cpu",
            0,
        )
        linear_probe.infer(
            final, DataLoader(linear_probe.FeatureDataset(*features["test"]), batch_size=BATCH), False, "cpu"
        )
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = real_cuda
        linear_probe.accuracy = real_accuracy
    seconds["shapes_probe"] = time.perf_counter() - start
    return seconds


def _accuracy(output, target, topk=(1,)):
    top = output.topk(max(topk), 1, True, True)[1].t() == target.view(1, -1)
    return [float(top[:k].float().sum()) / len(target) for k in topk]


def clip_pl_tasks(model, config, tasks) -> dict[str, float]:
    from clip_pl.eval.suite import evaluate_task

    seconds = {}
    for task in tasks:
        start = time.perf_counter()
        evaluate_task(model, config, task, batch_size=BATCH, num_workers=0)
        seconds[task.name] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20, help="test images per shape class (train: twice that)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best time counts")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from clip_pl.eval.demo_tasks import SHAPE_TEMPLATES, write_demo_tasks
    from clip_pl.eval.tasks import load_task_list
    from clip_pl.model import build_clip, get_tokenizer, image_transforms, resolve_model_config

    torch.manual_seed(0)
    config = resolve_model_config(arch_config=ARCH)
    model = build_clip(config).eval()
    transform = image_transforms(64)[1]
    tokenizer = get_tokenizer(32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tasks = load_task_list(write_demo_tasks(root, per_class=args.per_class))
        shapes = next(t for t in tasks if t.name == "shapes")
        ours: Counter = Counter()
        theirs: Counter = Counter()
        for repeat in range(args.repeats):
            for side, run in (
                ("clip_pl", lambda: clip_pl_tasks(model, config, tasks)),
                (
                    "clip_benchmark",
                    lambda: clip_benchmark_tasks(
                        model, transform, tokenizer, root, list(shapes.classnames), SHAPE_TEMPLATES
                    ),
                ),
            ):
                best = ours if side == "clip_pl" else theirs
                with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):  # progress bars
                    measured = run()
                for name, s in measured.items():
                    best[name] = min(best[name], s) if repeat else s
        sizes = {t.name: t.type for t in tasks}
    rows = {
        name: {
            "type": sizes[name],
            "clip_pl_s": ours[name],
            "clip_benchmark_s": theirs[name],
            "ratio": theirs[name] / ours[name],
        }
        for name in ours
    }
    total = {"clip_pl_s": sum(ours.values()), "clip_benchmark_s": sum(theirs.values())}
    total["ratio"] = total["clip_benchmark_s"] / total["clip_pl_s"]
    print("| task | type | clip_pl s | clip_benchmark s | clip_benchmark / clip_pl |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['type']} | {row['clip_pl_s']:.2f} | {row['clip_benchmark_s']:.2f} | {row['ratio']:.2f} |"
        )
    print(f"| all | | {total['clip_pl_s']:.2f} | {total['clip_benchmark_s']:.2f} | **{total['ratio']:.2f}** |")
    result = {"per_class": args.per_class, "threads": torch.get_num_threads(), "tasks": rows, "total": total}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
