"""The project's own evaluation tasks, drawn here (nothing downloaded), and a task list naming them.

    python -m clip_pl.eval.demo_tasks --out demo_out/tasks --digits demo_out/corpus/test
    python -m clip_pl.eval checkpoint=runs/demo/checkpoints/last.ckpt eval=suite eval.task_list=demo_out/tasks/tasks.yaml

  * ``digits``   zero-shot on the demo corpus's held-out digits (``--digits``: its ImageFolder with
                 ``classnames.txt`` and ``templates.txt``; left out without it);
  * ``shapes``   zero-shot on 12 procedurally drawn colour × shape classes ("red circle" …), size,
                 place, tint and background varied per image;
  * ``shape_captions``  image↔text retrieval: drawn shapes in WebDataset shards, two captions each
                 (colour, shape, size and place);
  * ``shapes_probe``    linear probe: a training and a test split of drawn shapes (the weight decay is
                 picked on a held-out fifth of the training split).
Everything is seeded: the same files on every run.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SHAPE_TEMPLATES = ("a {}.", "a drawing of a {}.", "a {} on a grey background.")
SIZE = 48


def draw_shape(colour: str, shape: str, rng: random.Random) -> tuple[Image.Image, str, str]:
    """(image, "small"/"large", where it sits) for one drawn shape."""
    background = tuple(rng.randint(170, 235) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    side = rng.randint(14, 30)
    x, y = rng.randint(1, SIZE - side - 1), rng.randint(1, SIZE - side - 1)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    draw = ImageDraw.Draw(image)
    box = (x, y, x + side, y + side)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    centre_x, centre_y = x + side / 2, y + side / 2
    place = f"{'top' if centre_y < SIZE / 2 else 'bottom'} {'left' if centre_x < SIZE / 2 else 'right'}"
    return image, "small" if side < 22 else "large", place


def classes() -> list[tuple[str, str]]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def write_shapes_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = random.Random(seed)
    for colour, shape in classes():
        folder = root / f"{colour} {shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(colour, shape, rng)[0].save(folder / f"{i:03d}.png")
    return root


def write_caption_shards(directory: Path, per_class: int, seed: int, num_shards: int = 2) -> list[Path]:
    """Drawn shapes with two captions each (one per line of the .txt), split over ``num_shards`` tars."""
    rng = random.Random(seed)
    samples = []
    for colour, shape in classes():
        for _ in range(per_class):
            image, size, place = draw_shape(colour, shape, rng)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            captions = f"a {size} {colour} {shape}\na {colour} {shape} in the {place}"
            samples.append((buffer.getvalue(), captions.encode()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = directory / f"{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(s, len(samples), num_shards):
                for ext, data in zip(("png", "txt"), samples[index]):
                    info = tarfile.TarInfo(f"{index:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def write_demo_tasks(out: str | Path, digits: str | Path | None = None, per_class: int = 6) -> Path:
    """Draw the shape sets under ``out`` and write ``out/tasks.yaml``; returns its path."""
    out = Path(out)
    write_shapes_folder(out / "shapes" / "test", per_class, seed=1)
    write_shapes_folder(out / "shapes" / "train", 2 * per_class, seed=2)
    write_caption_shards(out / "shape_captions", max(1, per_class // 3), seed=3)
    lines = [
        "# The demo's evaluation suite (written by python -m clip_pl.eval.demo_tasks). Paths are relative to this file.",
        "tasks:",
    ]
    if digits is not None:
        digits = Path(digits)
        lines += [
            "  digits:",
            "    type: zeroshot_classification",
            f"    data: {_relative(digits, out)}",
            f"    classnames: {_relative(digits / 'classnames.txt', out)}",
            f"    templates: {_relative(digits / 'templates.txt', out)}",
        ]
    lines += [
        "  shapes:",
        "    type: zeroshot_classification",
        "    data: shapes/test",
        f"    templates: {list(SHAPE_TEMPLATES)}",
        "  shape_captions:",
        "    type: retrieval",
        "    data: {format: wds, path: shape_captions, text_key: txt}",
        "    recall_k: [1, 5, 10]",
        "  shapes_probe:",
        "    type: linear_probe",
        "    train: shapes/train",
        "    test: shapes/test",
        "    val_fraction: 0.2",
    ]
    path = out / "tasks.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the drawn sets and tasks.yaml")
    parser.add_argument("--digits", default=None, help="the demo corpus's held-out ImageFolder (demo_out/corpus/test)")
    parser.add_argument("--per-class", type=int, default=6, help="test images per shape class")
    args = parser.parse_args(argv)
    path = write_demo_tasks(args.out, args.digits, args.per_class)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
