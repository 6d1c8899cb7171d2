"""The demo corpus: scikit-learn's handwritten digits served by a local fault-injecting web server,
downloaded with the real img2dataset into WebDataset shards, plus a labelled held-out test split.

    python -m data_prep.demo --out demo_data
    from data_prep.demo import build_demo_corpus
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_demo_corpus"]


def __getattr__(name: str) -> Any:
    # Lazy: `from data_prep.demo import digits` (tests, the benchmark) does not load the downloader.
    if name == "build_demo_corpus":
        from data_prep.demo.build import build_demo_corpus

        return build_demo_corpus
    raise AttributeError(f"module 'data_prep.demo' has no attribute {name!r}")
