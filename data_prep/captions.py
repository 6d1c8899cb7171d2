"""Caption and URL hygiene that img2dataset does not do, with every dropped row counted by reason.

Runs on the whole table before any download, so dropped rows cost no bandwidth:
  - captions: mojibake and HTML entities repaired with ftfy, whitespace collapsed to single spaces;
  - dropped: missing URL, empty caption, caption shorter than `min_chars`, repeated URL (optional).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import ftfy
import pandas as pd

DROP_REASONS = ("missing_url", "empty_caption", "short_caption", "duplicate_url")


def clean_caption(text) -> str:
    """Unicode repaired, whitespace collapsed; non-strings (NaN, None) become ''."""
    if not isinstance(text, str):
        return ""
    return " ".join(ftfy.fix_text(text).split())


@dataclass
class HygieneReport:
    rows_in: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    captions_unicode_fixed: int = 0
    captions_whitespace_normalised: int = 0

    def as_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "dropped_by_reason": {r: int(self.dropped.get(r, 0)) for r in DROP_REASONS},
            "captions_unicode_fixed": self.captions_unicode_fixed,
            "captions_whitespace_normalised": self.captions_whitespace_normalised,
        }


def apply_hygiene(
    table: pd.DataFrame,
    url_col: str = "url",
    caption_col: str = "caption",
    min_chars: int = 2,
    dedup_url: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, HygieneReport]:
    """(kept rows, dropped rows with a `drop_reason` column, report). Kept + dropped = input."""
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    report = HygieneReport(rows_in=len(table))
    raw = table[caption_col]
    fixed = raw.map(lambda t: ftfy.fix_text(t) if isinstance(t, str) else "")
    cleaned = fixed.map(lambda t: " ".join(t.split()))
    is_str = raw.map(lambda t: isinstance(t, str))
    report.captions_unicode_fixed = int((is_str & (fixed != raw)).sum())
    report.captions_whitespace_normalised = int((is_str & (cleaned != fixed)).sum())

    urls = table[url_col].map(lambda u: u.strip() if isinstance(u, str) else "")
    reason = pd.Series("", index=table.index, dtype=object)
    # First matching reason wins, in DROP_REASONS order, so each dropped row is counted once.
    reason[urls == ""] = "missing_url"
    reason[(reason == "") & (cleaned == "")] = "empty_caption"
    reason[(reason == "") & (cleaned.str.len() < min_chars)] = "short_caption"
    if dedup_url:
        # Only rows still in play compete, so a dropped empty-caption row does not shadow a good one.
        repeated = urls.where(reason == "").duplicated(keep="first") & (reason == "")
        reason[repeated] = "duplicate_url"

    out = table.copy()
    out[url_col] = urls
    out[caption_col] = cleaned
    keep = reason == ""
    kept = out[keep].reset_index(drop=True)
    dropped = out[~keep].assign(drop_reason=reason[~keep]).reset_index(drop=True)
    report.dropped = Counter(dropped["drop_reason"])
    report.rows_kept = len(kept)
    assert report.rows_kept + sum(report.dropped.values()) == report.rows_in
    return kept, dropped, report
