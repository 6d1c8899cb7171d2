"""The demo corpus: scikit-learn's handwritten digits served by a local fault-injecting web server,
downloaded with the real img2dataset into WebDataset shards, plus a labelled held-out test split.

    python -m data_prep.demo --out demo_data
    from data_prep.demo import build_demo_corpus
"""

from data_prep.demo.build import build_demo_corpus

__all__ = ["build_demo_corpus"]
