"""A small CLIP trained on the demo's digits, exported the way a user would score with it, and
WebDataset shards of held-out digits with a share of mismatched captions. Shared by the curation tests.

The demo's own run (`make demo`: the tiny model, 150 steps of 64 on 2 cores) takes ~2.5 min; this is
the same recipe cut to what the tests can pay for: the demo's digits and caption templates, the
project's towers (`clip_pl.model`) and loss (`clip_pl.loss.ClipLoss`), a narrower tower pair on
32 px, and the 49 408-token embedding frozen at its random init (its Adam update was a third of
each step; the transformer learns on top of fixed random token vectors). Then the real path:
`save_clip_pl_checkpoint` → `export_open_clip` → `local-dir:` for open_clip.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import torch

from clip_pl.interchange import export_open_clip, save_clip_pl_checkpoint
from clip_pl.loss import ClipLoss
from clip_pl.model import build_clip, resolve_model_config
from data_prep.demo import digits

ARCH = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32, mlp_ratio=2.0),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2, mlp_ratio=2.0),
)
SERVED_SIZE = 48  # the shards hold 48 px PNGs; the model's preprocess resizes them to 32


def train_digits_clip(out_dir: Path, steps: int = 300, batch: int = 128, seed: int = 0) -> str:
    """Train on the training split of the digits; returns the open_clip model name `local-dir:…`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # measured: 1 thread is ~2x faster than 2 for a model this small on a busy machine
    try:
        torch.manual_seed(seed)
        config = resolve_model_config(arch_config=ARCH)
        model = build_clip(config)
        model.token_embedding.requires_grad_(False)
        preprocess = open_clip.image_transform(ARCH["vision_cfg"]["image_size"], is_train=False)
        tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=ARCH["text_cfg"]["context_length"])
        images, labels = digits.load_digits_arrays()
        train, _ = digits.stratified_split(labels, 0.2, seed)
        pixels = torch.stack([preprocess(digits.upscale(images[i], SERVED_SIZE)) for i in train])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
        loss_fn, rng, draw = ClipLoss(), random.Random(seed), np.random.default_rng(seed)
        for _ in range(steps):
            rows = draw.choice(len(train), batch, replace=False)
            texts = tokenizer([digits.caption_for(int(labels[train[r]]), rng) for r in rows])
            image_features, text_features, logit_scale = model(pixels[rows], texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    checkpoint = save_clip_pl_checkpoint(model, config, out_dir / "digits.ckpt")
    export_open_clip(checkpoint, out_dir / "exported", name="digits-tiny")
    return f"local-dir:{out_dir / 'exported'}"


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_mismatched_corpus(
    out_dir: Path, shuffled_share: float = 0.2, copies: int = 2, shards: int = 3, seed: int = 0
) -> dict[str, bool]:
    """Shards of the held-out digits (each served `copies` times, different captions), a share of them
    captioned as another digit; plus one undecodable image and one blank caption. Returns {key: mismatched}.

    "Shuffled" captions name a different digit on purpose: a caption shuffled at random names the same
    digit one time in ten, and such a pair is a true pair, not noise a filter should remove.
    """
    images, labels = digits.load_digits_arrays()
    _, test = digits.stratified_split(labels, 0.2, seed)
    rng, draw = random.Random(seed + 1), np.random.default_rng(seed + 1)
    samples = [(int(i), copy) for copy in range(copies) for i in test]
    mismatched = draw.random(len(samples)) < shuffled_share
    truth, out_dir = {}, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tars = [tarfile.open(out_dir / f"{s:05d}.tar", "w") for s in range(shards)]
    for n, ((index, copy), wrong) in enumerate(zip(samples, mismatched)):
        label = int(labels[index])
        named = (label + rng.randint(1, 9)) % 10 if wrong else label
        key = f"{n:08d}"
        size = SERVED_SIZE - 8 * (copy % 3)  # the copies differ in size too
        _add(tars[n % shards], f"{key}.png", digits.png_bytes(digits.upscale(images[index], size)))
        _add(tars[n % shards], f"{key}.txt", digits.caption_for(named, rng).encode())
        _add(tars[n % shards], f"{key}.json", json.dumps({"key": key, "label": label}).encode())
        truth[key] = bool(wrong)
    _add(tars[0], "broken01.png", b"<html>not an image</html>")
    _add(tars[0], "broken01.txt", b"a scan of a handwritten 3")
    _add(tars[1], "blank001.png", digits.png_bytes(digits.upscale(images[test[0]], SERVED_SIZE)))
    _add(tars[1], "blank001.txt", b"   ")
    for tar in tars:
        tar.close()
    return truth


def jpeg_bytes(image, quality: int = 70) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_corpus_with_copies(
    out_dir: Path,
    eval_dir: Path,
    copies: int = 150,
    eval_images: int = 100,
    shards: int = 4,
    seed: int = 0,
    originals: int | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Shards of all 1797 digits, or the first `originals` (48 px PNG, each once: no two scans are equal) plus `copies` planted
    near-copies (resized to 40 or 56 px, re-encoded as JPEG q70) at random places; an evaluation
    folder holding `eval_images` of the digits at 64 px (PNG files, and some inside a .tar).

    Returns ({copy key: original key}, {corpus key of an eval image: its eval name}).
    """
    images, labels = digits.load_digits_arrays()
    images, labels = images[:originals], labels[:originals]
    draw, rng = np.random.default_rng(seed), random.Random(seed)
    planted = draw.choice(len(images), copies, replace=False)
    items = [
        (f"o{i:05d}", digits.png_bytes(digits.upscale(images[i], SERVED_SIZE)), int(labels[i]))
        for i in range(len(images))
    ]
    items += [
        (f"c{i:05d}", jpeg_bytes(digits.upscale(images[i], 40 if n % 2 else 56)), int(labels[i]))
        for n, i in enumerate(planted)
    ]
    order = draw.permutation(len(items))
    out_dir.mkdir(parents=True, exist_ok=True)
    tars = [tarfile.open(out_dir / f"{s:05d}.tar", "w") for s in range(shards)]
    for position, item in enumerate(order):
        name, payload, label = items[item]
        key = f"{position:06d}{name}"  # the position first: (shard, key) order is the corpus order
        tar = tars[position * shards // len(order)]
        _add(tar, f"{key}.{'png' if name[0] == 'o' else 'jpg'}", payload)
        _add(tar, f"{key}.txt", digits.caption_for(label, rng).encode())
    for tar in tars:
        tar.close()
    key_of = {items[item][0]: f"{position:06d}{items[item][0]}" for position, item in enumerate(order)}
    copies_of = {key_of[f"c{i:05d}"]: key_of[f"o{i:05d}"] for i in planted}

    eval_dir.mkdir(parents=True, exist_ok=True)
    chosen = draw.choice(len(images), eval_images, replace=False)
    eval_of = {}
    with tarfile.open(eval_dir / "more.tar", "w") as tar:
        for n, i in enumerate(chosen):
            payload = digits.png_bytes(digits.upscale(images[i], 64))
            if n % 3:
                (eval_dir / f"{i:05d}.png").write_bytes(payload)
                eval_of[key_of[f"o{i:05d}"]] = f"{i:05d}.png"
            else:
                _add(tar, f"e{i:05d}.png", payload)
                eval_of[key_of[f"o{i:05d}"]] = f"more.tar:e{i:05d}"
    return copies_of, eval_of
