"""The one writer of small WebDataset shards for tests and benchmarks (no download).

Training-style shards, img2dataset's layout (``{key}.jpg + .txt + .json`` per sample, plus
``sizes.json``), with synthetic pictures and a caption that names them:

    from tests.support.fake_shards import write_shards
    write_shards("/tmp/shards", sizes=[10, 3, 7], image_px=(64, 96))

Any other samples (labelled ``.png + .cls``, several captions …): ``write_sample_shards``.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw


def synthetic_image(index: int, width: int, height: int) -> Image.Image:
    """A smooth colour gradient with a shape on it: compresses like a photo, not like noise or flat colour."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    freq = rng.uniform(0.5, 4.0, size=3) * np.pi / max(width, height)
    channels = [base[c] / 2 + 60 * np.sin(freq[c] * (x + y * (c + 1))) + 60 for c in range(3)]
    arr = np.clip(np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    draw.ellipse([x0, y0, x0 + width // 3, y0 + height // 3], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: Sequence[dict[str, bytes]]) -> None:
    """``samples``: dicts of ``__key__`` plus extension → bytes, written in order like img2dataset does."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext != "__key__":
                    add_member(tar, f"{key}.{ext}", data)


def make_sample(
    key: str,
    index: int,
    image_px: tuple[int, int] = (64, 96),
    rng: random.Random | None = None,
    caption: str | None = None,
) -> dict[str, bytes]:
    rng = rng or random.Random(index)
    width, height = rng.randint(*image_px), rng.randint(*image_px)
    text = caption if caption is not None else f"a synthetic picture number {index} with a round shape"
    return {
        "__key__": key,
        "jpg": jpeg_bytes(synthetic_image(index, width, height)),
        "txt": text.encode(),
        "json": json.dumps({"key": key, "caption": text}).encode(),
    }


def write_sample_shards(directory: str | os.PathLike, shards: Sequence[Sequence[dict[str, bytes]]]) -> list[str]:
    """Write ``shards[i]`` (samples: ``__key__`` plus extension → bytes) as ``0000i.tar``, and a
    ``sizes.json`` counting them; return the paths."""
    os.makedirs(directory, exist_ok=True)
    paths, manifest = [], {}
    for shard_id, samples in enumerate(shards):
        name = f"{shard_id:05d}.tar"
        path = os.path.join(directory, name)
        write_shard(path, samples)
        paths.append(path)
        manifest[name] = len(samples)
    with open(os.path.join(directory, "sizes.json"), "w") as f:
        json.dump(manifest, f)
    return paths


def write_shards(
    directory: str,
    sizes: Sequence[int],
    image_px: tuple[int, int] = (64, 96),
    sample_fn: Callable[[str, int], dict[str, bytes]] | None = None,
) -> list[str]:
    """Write ``len(sizes)`` shards ``00000.tar …`` with globally unique keys and a sizes.json; return paths."""
    shards, index = [], 0
    for shard_id, size in enumerate(sizes):
        samples = []
        for i in range(size):
            key = f"{shard_id:05d}{i:04d}"
            samples.append(sample_fn(key, index) if sample_fn else make_sample(key, index, image_px))
            index += 1
        shards.append(samples)
    return write_sample_shards(directory, shards)
