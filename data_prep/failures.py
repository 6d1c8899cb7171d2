"""Name the reason behind each img2dataset failure, so failures can be counted by cause.

img2dataset records a free-text `error_message` per failed URL (the str() of whatever urllib or
the resizer raised). Messages carry per-URL details (byte counts, hosts), so they are grouped
twice: by a stable reason name (`reason_of`) and by the message with its numbers masked
(`message_group`), which keeps unforeseen errors visible instead of folding them into "other".
"""

from __future__ import annotations

import re

# reason, then the pattern (case-insensitive) that names it, in priority order; the patterns match
# img2dataset 1.47 / urllib messages. A table, one reason a line, so that adding one is one line.
_REASON_TABLE = r"""
opted_out               disallowed by X-Robots-Tag
timeout                 timed out|timeout
truncated_transfer      IncompleteRead|Connection broken|RemoteDisconnected
not_an_image            Image decoding error|cannot identify image
hash_mismatch           hash mismatch
image_too_small         image too small
image_area_too_large    image area too large
aspect_ratio_too_large  aspect ratio too large
connection_refused      Connection refused
connection_reset        Connection reset
dns_error               Name or service not known|nodename nor servname|getaddrinfo
ssl_error               SSL|certificate
bad_url                 unknown url type|no host given|Invalid URL
"""
_REASONS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (reason, re.compile(pattern, re.I))
    for reason, pattern in (line.split(None, 1) for line in _REASON_TABLE.strip().splitlines())
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
