"""The CPU path's decode (``clip_pl.data.decode.decode_pixels``) against PIL's (``decode_image``).

Small plain JPEGs are decoded by torchvision straight into a tensor, everything else by PIL; either
way the pixels, the counts and the refusals must be PIL's, since the loader's accounting and every
earlier test of the CPU path rest on them.
"""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from clip_pl.data import decode as decode_module
from clip_pl.data.decode import BadSample, decode_image, decode_pixels
from tests.support.fake_shards import jpeg_bytes, synthetic_image


def _pil(sample, target, max_pixels=decode_module.DEFAULT_MAX_IMAGE_PIXELS):
    counts = Counter()
    image = decode_image(sample, target, counts, max_pixels)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1), counts


def _progressive(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", progressive=True, quality=85)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def decoders_used(monkeypatch):
    """Which decoder ran for each call: 'torchvision' or 'pil'."""
    used = []
    real_jpeg, real_pil = decode_module._decode_jpeg_rgb, decode_module.decode_image

    def via_torchvision(*args, **kwargs):
        used.append("torchvision")
        return real_jpeg(*args, **kwargs)

    def via_pil(*args, **kwargs):
        used.append("pil")
        return real_pil(*args, **kwargs)

    monkeypatch.setattr(decode_module, "_decode_jpeg_rgb", via_torchvision)
    monkeypatch.setattr(decode_module, "decode_image", via_pil)
    return used


def test_pixels_and_counts_are_pils_and_small_plain_jpegs_skip_pil(decoders_used):
    cases = [  # (bytes, target size, decoder expected)
        (jpeg_bytes(synthetic_image(0, 256, 256), quality=95), 224, "torchvision"),  # LAION-like
        (jpeg_bytes(synthetic_image(1, 300, 257)), 224, "torchvision"),
        (jpeg_bytes(synthetic_image(2, 256, 256).convert("L")), 224, "torchvision"),  # counted as grey
        (_progressive(synthetic_image(3, 240, 320)), 224, "torchvision"),
        (jpeg_bytes(synthetic_image(4, 40, 30)), None, "torchvision"),  # evaluation's full decode
        (jpeg_bytes(synthetic_image(5, 900, 500)), 224, "pil"),  # draft mode: PIL's reduced-scale decode
        (jpeg_bytes(synthetic_image(6, 900, 500)), None, "torchvision"),  # no target: every pixel
        (jpeg_bytes(synthetic_image(7, 64, 64).convert("CMYK")), 224, "pil"),  # four components
        (_png(synthetic_image(8, 50, 60)), 32, "pil"),
        (jpeg_bytes(synthetic_image(9, 64, 64)) + b"trailing junk", 224, "pil"),  # no end marker at the end
    ]
    for data, target, decoder in cases:
        decoders_used.clear()
        counts = Counter()
        pixels = decode_pixels({"jpg": data}, target, counts)
        assert decoders_used[0] == decoder, (target, decoder, decoders_used)
        reference, reference_counts = _pil({"jpg": data}, target)
        assert pixels.dtype == torch.uint8 and pixels.shape == reference.shape
        assert torch.equal(pixels, reference), f"decoded pixels differ from PIL's ({decoder}, target {target})"
        assert counts == reference_counts, (counts, reference_counts)


def test_refusals_are_pils(decoders_used):
    good = jpeg_bytes(synthetic_image(0, 200, 180))
    bomb = bytearray(good)
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")  # 900 Mpx in the header
    cases = {
        "truncated": (good[: len(good) // 2], "corrupt_image"),
        "bomb": (bytes(bomb), "decompression_bomb"),
        "not an image": (b"\xff\xd8 not a jpeg at all", "corrupt_image"),
        "missing": (None, "missing_image"),
    }
    for name, (data, reason) in cases.items():
        sample = {} if data is None else {"jpg": data}
        with pytest.raises(BadSample) as got:
            decode_pixels(sample, 224, Counter())
        with pytest.raises(BadSample) as expected:
            decode_image(sample, 224, Counter())
        assert got.value.reason == expected.value.reason == reason, name
    decoders_used.clear()
    with pytest.raises(BadSample, match="decompression_bomb"):
        decode_pixels({"jpg": bytes(bomb)}, 224, Counter())
    assert decoders_used == [], "a bomb is refused from the header walk, before any decoder runs"


def test_damaged_jpegs_are_refused_or_decoded_as_pil_does():
    """Byte damage in the scan, in the headers, a cut file with its end marker put back: torchvision must
    refuse where PIL refuses and give PIL's pixels where PIL decodes. It may refuse more (libjpeg's fatal
    errors are the same, a repaired scan is the one case measured: 1 in 400): never fewer."""
    base = [jpeg_bytes(synthetic_image(i, 200 + i, 180)) for i in range(4)]
    stricter = 0
    for seed in range(120):
        rng = random.Random(seed)
        data = bytearray(base[seed % 4])
        if seed % 3 == 0:
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data) // 3, len(data) - 2)] = rng.randrange(256)
        elif seed % 3 == 1:
            data = data[: rng.randrange(len(data) // 2, len(data) - 2)] + b"\xff\xd9"
        else:
            data[rng.randrange(2, 600)] = rng.randrange(256)
        sample = {"jpg": bytes(data)}
        try:
            reference = _pil(sample, 224)[0]
        except BadSample:
            with pytest.raises(BadSample):
                decode_pixels(sample, 224, Counter())
            continue
        try:
            pixels = decode_pixels(sample, 224, Counter())
        except BadSample:
            stricter += 1
            continue
        assert torch.equal(pixels, reference), f"seed {seed}: decoded, but not PIL's pixels"
    assert stricter <= 3


def test_the_kernel_called_straight_is_torchvisions_decode_jpeg():
    """decode_pixels calls torchvision's registered CPU kernel without its Python wrapper when the kernel
    has the expected arguments (this torchvision's), else the public decode_jpeg: both give its pixels."""
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    data = torch.frombuffer(bytearray(jpeg_bytes(synthetic_image(0, 64, 48), quality=90)), dtype=torch.uint8)
    reference = decode_jpeg(data, mode=ImageReadMode.RGB)
    straight = decode_module._cpu_jpeg_decoder(torch.ops.image.decode_jpeg)
    assert straight is not None and straight.__name__ == "kernel_rgb", (
        f"torchvision {torchvision.__version__}'s kernel not taken"
    )
    assert torch.equal(straight(data), reference)

    class OtherKernel:  # a future torchvision whose kernel takes other arguments
        class default:
            class _schema:
                arguments = [type("A", (), {"name": n}) for n in ("data", "mode", "device")]

    fallback = decode_module._cpu_jpeg_decoder(OtherKernel())
    assert fallback.__name__ == "wrapper_rgb" and torch.equal(fallback(data), reference)


def test_a_jpeg_padded_with_zeros_after_its_end_is_complete_in_any_buffer(decoders_used):
    """Zero padding after the end-of-image marker (some writers align files) is still a complete JPEG,
    whether the bytes come as bytes or as the tar reader's bytearray."""
    data = jpeg_bytes(synthetic_image(0, 64, 48)) + bytes(16)
    reference, _ = _pil({"jpg": data}, 224)
    for buffer in (data, bytearray(data)):
        decoders_used.clear()
        assert torch.equal(decode_pixels({"jpg": buffer}, 224, Counter()), reference)
        assert decoders_used == ["torchvision"], type(buffer)
