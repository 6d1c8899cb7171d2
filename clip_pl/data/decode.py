"""One raw webdataset sample (bytes) → (RGB image, caption), or a named reason to skip it.

Everything here runs inside DataLoader workers. A sample is never allowed to raise anything but
:class:`BadSample`, whose ``reason`` is counted (``skipped/<reason>``); images in a mode other
than RGB are converted and counted too (``converted/<what>``). Training (``clip_pl.data.stream``)
and evaluation (``clip_pl.eval.datasets``) decode with these same rules.

Training's workers call :func:`decode_pixels`: a plain RGB or grey JPEG that needs no reduced-scale
decode (LAION's 256-px shards) is decoded by ``torchvision.io.decode_jpeg`` straight into a uint8
tensor. PIL decodes the same pixels (both are libjpeg-turbo, same IDCT and upsampling; tested), but
its header parse and the copy out of its image memory cost about as much as the decode itself at
256 px. Everything else (large JPEGs, which PIL's draft mode decodes at a reduced scale; PNG, WebP,
CMYK; whatever the header walk cannot vouch for) takes :func:`decode_image`.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from clip_pl.data.jpeg import COMPONENT_MODES, draft_size, ends_complete, jpeg_frame, pixel_limit

# The extensions a sample's image may have, in the order they are looked for.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
CAPTION_KEY = "txt"
# PIL's own bomb threshold (~89.5 Mpx): larger images are refused before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_text(sample: Mapping[str, Any], key: str = CAPTION_KEY) -> str:
    """The sample's ``key`` entry as text (UTF-8), stripped; may be empty."""
    data = sample.get(key)
    if data is None:
        raise BadSample("missing_caption")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else str(data)
    except UnicodeDecodeError as e:
        raise BadSample("non_utf8_caption", str(e)) from None
    return text.strip()


def decode_caption(sample: Mapping[str, Any]) -> str:
    text = decode_text(sample)
    if not text:
        raise BadSample("empty_caption")
    return text


def image_bytes(sample: Mapping[str, Any]) -> bytes:
    for key in IMAGE_KEYS:
        data = sample.get(key)
        if data is not None:
            return data
    raise BadSample("missing_image")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image's header parsed, no pixel decoded yet; decompression bombs refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # we enforce our own pixel limit below, PIL's warning is noise
            img = Image.open(io.BytesIO(data))
            width, height = img.size
    except Image.DecompressionBombError as e:
        raise BadSample("decompression_bomb", str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error… on broken files
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    if width * height > max_pixels:
        raise BadSample("decompression_bomb", f"{width}x{height} > {max_pixels} px")
    return img


def draft_for(img: Image.Image, target_size: int | None) -> None:
    """Set a large JPEG to decode at a reduced scale that still covers ``target_size`` (``img.size`` is
    then the reduced size): DCT-domain downscale by 1/2, 1/4 or 1/8; PIL keeps both sides >= the
    requested size, so the crop that follows still works from at least target_size pixels per side."""
    if target_size and img.format == "JPEG" and min(img.size) >= 2 * target_size:
        img.draft(None, (target_size, target_size))


def decode_image(
    sample: Mapping[str, Any], target_size: int | None, counts: Counter, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """The sample's image in RGB. With ``target_size`` a large JPEG is decoded at a reduced scale that
    still covers it (training's speed-up); None decodes every pixel (evaluation, as published numbers do)."""
    img = open_image(image_bytes(sample), max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            draft_for(img, target_size)
            img.load()
    except Image.DecompressionBombError as e:
        raise BadSample("decompression_bomb", str(e)) from None
    except Exception as e:
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    return to_rgb(img, counts)


def quick_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, int, int] | None:
    """(mode, width, height) of an RGB or grey JPEG from its header walk (``clip_pl.data.jpeg``), refusing a
    decompression bomb as :func:`open_image` would; None when the walk cannot vouch for it (PIL decides)."""
    frame = jpeg_frame(data)
    if frame is None or frame[2] not in COMPONENT_MODES:
        return None
    width, height, components = frame
    if width * height > pixel_limit(max_pixels):
        raise BadSample("decompression_bomb", f"{width}x{height} > {max_pixels} px")
    return COMPONENT_MODES[components], width, height


# torchvision warns on every call that its image decoding is deprecated (in favour of TorchCodec,
# docs/dependencies.md): once per sample, in every worker.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")


def _cpu_jpeg_decoder(kernel: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``decode_jpeg(data, mode=RGB)`` on the CPU. Where ``kernel`` (torchvision's registered CPU kernel)
    takes the arguments this code expects, it is called straight: the Python wrapper logs the API use,
    warns of the deprecation and checks its arguments on every call, ~10 µs a sample (3 % of a worker's
    time on 256-px shards). Otherwise, the wrapper."""
    try:
        arguments = [a.name for a in kernel.default._schema.arguments]
    except (AttributeError, RuntimeError):
        arguments = None
    rgb = ImageReadMode.RGB

    def kernel_rgb(data: torch.Tensor) -> torch.Tensor:
        return kernel(data, rgb.value, False)

    def wrapper_rgb(data: torch.Tensor) -> torch.Tensor:
        return decode_jpeg(data, mode=rgb)

    return kernel_rgb if arguments == ["data", "mode", "apply_exif_orientation"] else wrapper_rgb


_decode_jpeg_rgb = _cpu_jpeg_decoder(getattr(torch.ops.image, "decode_jpeg", None))


def decode_pixels(
    sample: Mapping[str, Any], target_size: int | None, counts: Counter, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """The sample's image as uint8 3×H×W RGB, with :func:`decode_image`'s rules and counts (see the module doc
    for which decoder runs). A JPEG without its end-of-image marker goes to PIL, which refuses it if truncated."""
    data = image_bytes(sample)
    header = quick_jpeg(data, max_pixels)
    if header is None or draft_size(header[1], header[2], target_size) != header[1:] or not ends_complete(data):
        return as_tensor(decode_image(sample, target_size, counts, max_pixels))
    try:
        writable = data if isinstance(data, bytearray) else bytearray(data)  # the tar reader's are (tarstream)
        pixels = _decode_jpeg_rgb(torch.frombuffer(writable, dtype=torch.uint8))
    except Exception as e:  # libjpeg's fatal errors: the same files PIL refuses
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    if header[0] == "L":
        counts["converted/grayscale"] += 1
    return pixels


# A read-only array (PIL's buffer) is wrapped, never written: every later step makes a new tensor.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def as_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as uint8 3×H×W (height × width × channel in memory, as the decoders give it)."""
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def to_rgb(img: Image.Image, counts: Counter) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    try:
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit grey: PIL's convert("RGB") clips at 255 (a white image); scale to 8 bits instead.
            arr = np.asarray(img, dtype=np.int64)
            peak = 65535 if mode.startswith("I;16") or arr.max() > 255 else 255
            arr8 = np.clip(arr * 255 // peak, 0, 255).astype(np.uint8)
            counts["converted/16bit"] += 1
            return Image.fromarray(arr8, "L").convert("RGB")
        if mode == "F":
            counts["converted/float"] += 1
            arr = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
            return Image.fromarray(arr, "L").convert("RGB")
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
            # Transparent pixels carry arbitrary colour; composite on white as browsers show them.
            counts["converted/alpha"] += 1
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        name = {"P": "palette", "CMYK": "cmyk", "L": "grayscale", "1": "grayscale"}.get(mode, "other")
        counts[f"converted/{name}"] += 1
        return img.convert("RGB")
    except Exception as e:
        raise BadSample("corrupt_image", f"cannot convert mode {mode}: {e}") from None
