"""What a JPEG's header says, read without decoding a pixel: size, components, completeness.

Why not PIL's header parser: it builds every table and the EXIF/ICC info (~0.1 ms a sample), as much
as a third of a worker's share on the device path and a sixth of the CPU path on 256-px shards. A walk
over the marker segments reads a few bytes per segment. Whatever it cannot vouch for (not a JPEG, a
scan before any frame header, a malformed segment, CMYK) goes to PIL, which decides as before.
Shared by the CPU path's fast decode (``clip_pl.data.decode.decode_pixels``) and the device path's
worker side (``clip_pl.data.device_decode.prepare``).
"""

from __future__ import annotations

from PIL import Image

# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic): they hold the size.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
COMPONENT_MODES = {1: "L", 3: "RGB"}  # the mode PIL gives a JPEG with that many components


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, walking the marker segments up to it;
    None when the walk cannot tell (not a JPEG, a scan before any frame, a malformed segment)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            if pos + 10 > end:
                return None
            height, width = (
                int.from_bytes(data[pos + 5 : pos + 7], "big"),
                int.from_bytes(data[pos + 7 : pos + 9], "big"),
            )
            return (width, height, data[pos + 9]) if width and height else None
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def draft_size(width: int, height: int, target_size: int | None) -> tuple[int, int]:
    """The size PIL's draft mode decodes a ``width × height`` JPEG at for ``target_size`` (decode.draft_for):
    the largest DCT scale 1/8, 1/4, 1/2 or 1 that keeps both sides at least the target, sides rounded up."""
    if not target_size or min(width, height) < 2 * target_size:
        return width, height
    fits = min(width // target_size, height // target_size)
    scale = next(s for s in (8, 4, 2, 1) if fits >= s)
    return (width + scale - 1) // scale, (height + scale - 1) // scale


def pixel_limit(max_pixels: int) -> float:
    """The pixel count above which an image is a decompression bomb: ours, or PIL's own refusal when it
    opens a file (twice its MAX_IMAGE_PIXELS), whichever is lower, so both decoders refuse alike."""
    return min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS) if Image.MAX_IMAGE_PIXELS else max_pixels


def ends_complete(data: bytes) -> bool:
    """Whether the file ends in the end-of-image marker (zero padding allowed). libjpeg only warns on a
    truncated file and fills the rest grey, where PIL refuses it."""
    # endswith first: rstrip copies the whole file (always, for the tar reader's bytearrays)
    return data.endswith(b"\xff\xd9") or data.rstrip(b"\0").endswith(b"\xff\xd9")
