"""Name the reason behind each img2dataset failure, so failures can be counted by cause.

img2dataset records a free-text `error_message` per failed URL (the str() of whatever urllib or
the resizer raised). Messages carry per-URL details (byte counts, hosts), so they are grouped
twice: by a stable reason name (`reason_of`) and by the message with its numbers masked
(`message_group`), which keeps unforeseen errors visible instead of folding them into "other".
"""

from __future__ import annotations

import re

# (reason, pattern) in priority order; patterns match img2dataset 1.47 / urllib messages.
_REASONS: tuple[tuple[str, re.Pattern], ...] = (
    ("opted_out", re.compile(r"disallowed by X-Robots-Tag", re.I)),
    ("timeout", re.compile(r"timed out|timeout", re.I)),
    ("truncated_transfer", re.compile(r"IncompleteRead|Connection broken|RemoteDisconnected", re.I)),
    ("not_an_image", re.compile(r"Image decoding error|cannot identify image", re.I)),
    ("hash_mismatch", re.compile(r"hash mismatch", re.I)),
    ("image_too_small", re.compile(r"image too small", re.I)),
    ("image_area_too_large", re.compile(r"image area too large", re.I)),
    ("aspect_ratio_too_large", re.compile(r"aspect ratio too large", re.I)),
    ("connection_refused", re.compile(r"Connection refused", re.I)),
    ("connection_reset", re.compile(r"Connection reset", re.I)),
    ("dns_error", re.compile(r"Name or service not known|nodename nor servname|getaddrinfo", re.I)),
    ("ssl_error", re.compile(r"SSL|certificate", re.I)),
    ("bad_url", re.compile(r"unknown url type|no host given|Invalid URL", re.I)),
)
_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
_NUMBER = re.compile(r"\d+")


def reason_of(error_message: str | None) -> str:
    """A short, stable name for why a URL produced no sample (e.g. 'http_404', 'timeout')."""
    if not error_message:
        return "unknown"
    http = _HTTP_STATUS.search(error_message)
    if http:
        return f"http_{http.group(1)}"
    for reason, pattern in _REASONS:
        if pattern.search(error_message):
            return reason
    return "other"


def message_group(error_message: str | None) -> str:
    """The message with numbers masked, so 'IncompleteRead(134 bytes read…)' variants group together."""
    if not error_message:
        return "<no message>"
    if _HTTP_STATUS.search(error_message):
        return error_message  # the status code is the message's meaning: keep it
    return _NUMBER.sub("N", error_message)
