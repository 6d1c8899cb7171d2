"""The demo's raw material: scikit-learn's bundled handwritten digits (1797 8x8 scans, no download),
upscaled into small "ink on paper" pictures, captioned from varied templates, split for zero-shot.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Caption templates: {n} the numeral, {w} the word. Varied on purpose, so the text tower must learn
# that "7", "seven" and the picture belong together rather than memorise one sentence.
CAPTION_TEMPLATES = (
    "a scan of a handwritten {n}",
    "the number {w}, written in ink",
    "a handwritten digit {n}",
    "a photo of the number {n}",
    "a blurry picture of the digit {w}",
    "a pixelated {n} drawn by hand",
    "the digit {n} on a white background",
    "someone wrote the number {w} with a pen",
    "a low resolution image of a handwritten {w}",
    "a close-up of the numeral {n}",
    "an ink sketch of the number {n}",
    "a black and white scan showing a {n}",
    "a handwritten {w} from a postal form",
    "the figure {n} \u2014 handwritten",  # em dash: non-ASCII, so mojibake noise has something to garble
    "a small drawing of the digit {w}",
    "a grayscale image of the number {n}",
    "digit {n}, handwritten and scanned",
    "a hand-drawn {w} on paper",
    "the numeral {w} as someone\u2019s handwriting",
    "a scanned form field containing a {n}",
)

# Zero-shot prompts. Class names are the numerals "0".."9": most caption templates use the numeral,
# and a numeral is a single BPE token, so "a photo of the number 7." is close to the training text.
ZERO_SHOT_TEMPLATES = (
    "a photo of the number {}.",
    "a scan of a handwritten {}.",
    "a handwritten digit {}.",
    "the digit {} on a white background.",
    "a pixelated {} drawn by hand.",
)
CLASS_NAMES = tuple(str(k) for k in range(10))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 8, 8] as dark ink on white paper, labels int [n])."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 - bundled with scikit-learn, no download

    digits = load_digits()
    ink = digits.images / 16.0  # the scans are 0..16 ink intensities
    paper = np.rint(255 * (1.0 - ink)).clip(0, 255).astype(np.uint8)
    return paper, digits.target.astype(int)


def upscale(image: np.ndarray, size: int) -> Image.Image:
    """An 8x8 scan as a size x size RGB picture, bicubic so strokes look drawn, not blocky."""
    return Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def caption_for(label: int, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(n=label, w=WORDS[label])


def add_noise(caption: str, rng: random.Random) -> str:
    """The mess of web alt-text that caption hygiene must undo (without dropping the row)."""
    if rng.random() < 0.5:
        return "  " + caption.replace(" ", "  \t", 1) + " \n"
    return caption.encode("utf-8").decode("latin-1", errors="replace")  # mojibake, e.g. "â€”"


def stratified_split(labels: np.ndarray, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), the test share taken per digit."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    indices = np.arange(len(labels))
    train, test = train_test_split(indices, test_size=test_share, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)
