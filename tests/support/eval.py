"""Helpers shared by the evaluation / inference / interchange tests (no tests here).

Tiny open_clip architectures, a clip_pl checkpoint writer, and small on-disk datasets built from
random images: an ImageFolder, labelled WebDataset shards and image-caption shards (written by
tests/support/fake_shards.py, the one shard writer).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip_pl.interchange import save_clip_pl_checkpoint
from clip_pl.model import build_clip, resolve_model_config
from tests.support.fake_shards import write_sample_shards

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# A ModifiedResNet vision tower (layers given as a list), as in RN50 but a few channels wide.
TINY_RESNET = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_model(arch_config: dict = TINY_VIT, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    config = resolve_model_config(arch_config=arch_config)
    return build_clip(config).eval(), config


def tiny_checkpoint(path: Path, arch_config: dict = TINY_VIT, seed: int = 0) -> tuple[Path, torch.nn.Module, dict]:
    model, config = tiny_model(arch_config, seed)
    return save_clip_pl_checkpoint(model, config, path), model, config


def assert_same_weights(actual: dict, expected: dict) -> None:
    """The same parameter and buffer names, each tensor bitwise equal (zip would stop at the shorter)."""
    assert list(actual) == list(expected), sorted(set(actual) ^ set(expected))[:5]
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def random_images(n: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Smooth colour fields rather than white noise, so images differ a lot for the random towers.
    images = []
    for _ in range(n):
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        images.append(Image.fromarray(base).resize((size, size), Image.BILINEAR))
    return images


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_imagefolder(root: Path, images: Sequence[Image.Image], labels: Sequence[int]) -> Path:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
    return root


def write_shards(directory: Path, samples: Sequence[dict], num_shards: int) -> list[str]:
    """Split ``samples`` (dicts of extension -> bytes) into ``num_shards`` contiguous shards, keys 000000 …"""
    bounds = np.linspace(0, len(samples), num_shards + 1).astype(int)
    keyed = [{"__key__": f"{i:06d}", **sample} for i, sample in enumerate(samples)]
    return write_sample_shards(directory, [keyed[bounds[s] : bounds[s + 1]] for s in range(num_shards)])


def labelled_samples(images: Sequence[Image.Image], labels: Sequence[int]) -> list[dict]:
    return [{"png": png_bytes(im), "cls": str(int(label)).encode()} for im, label in zip(images, labels)]


def caption_samples(images: Sequence[Image.Image], captions: Sequence[Sequence[str]]) -> list[dict]:
    return [
        {"jpg" if i % 2 else "png": _encode(im, "JPEG" if i % 2 else "PNG"), "txt": "\n".join(caps).encode()}
        for i, (im, caps) in enumerate(zip(images, captions))
    ]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


CLASSNAMES = ["cat", "dog", "red car", "tree", "boat", "horse", "cup"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}"]


@torch.no_grad()
def oracle_class_order(
    model: torch.nn.Module,
    config: dict,
    images: Sequence[Image.Image],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """Classes of each image sorted best-first, computed one image and one prompt at a time."""
    from clip_pl.model import get_tokenizer, image_transforms

    preprocess = image_transforms(config["vision_cfg"]["image_size"])[1]
    tokenizer = get_tokenizer(config["text_cfg"]["context_length"])
    classes = []
    for name in classnames:
        prompts = [model.encode_text(tokenizer([t.format(name)]))[0] for t in templates]
        mean = torch.stack([p / p.norm() for p in prompts]).mean(dim=0)
        classes.append(mean / mean.norm())
    orders = []
    for image in images:
        feature = model.encode_image(preprocess(image)[None])[0]
        orders.append((torch.stack(classes) @ (feature / feature.norm())).argsort(descending=True))
    return torch.stack(orders)


def labels_with_known_accuracy(order: torch.Tensor) -> tuple[list[int], float, float]:
    """Label image i with its best class (i % 3 == 0), its 3rd best (1) or its worst (2).

    So top-1 hits exactly the first group and top-5 the first two (with more than 5 classes).
    """
    labels = [int(order[i, (0, 2, -1)[i % 3]]) for i in range(len(order))]
    n = len(labels)
    top1 = sum(1 for i in range(n) if i % 3 == 0) / n
    top5 = sum(1 for i in range(n) if i % 3 != 2) / n
    return labels, top1, top5


# Captions per image; image 3 has none (it is only a gallery item), image 4 has three.
CAPTION_COUNTS = [2, 1, 1, 0, 3, 1, 2, 1, 1, 1]
WORDS = ["cat", "dog", "red", "blue", "tree", "boat", "sky", "cup", "ball", "road", "car", "hat"]


def captions_for(counts=CAPTION_COUNTS) -> list[list[str]]:
    out, w = [], 0
    for count in counts:
        caps = []
        for _ in range(count):
            # Unique captions for any count (past len(WORDS) the second word shifts by one): equal captions
            # tie exactly, and how a top-k breaks ties differs between implementations and CPU kernels.
            second = WORDS[(3 * w + 1 + w // len(WORDS)) % len(WORDS)]
            caps.append(f"a {WORDS[w % len(WORDS)]} and a {second}")
            w += 1
        out.append(caps)
    return out
