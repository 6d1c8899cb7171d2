"""clip_pl's tokenizer (``clip_pl.model.CLIPTokenizer``) gives open_clip's ids, whatever it remembers.

pytest tests/test_tokenizer.py
"""

from __future__ import annotations

import pickle
import random

import open_clip
import torch

from clip_pl.model import CLIPTokenizer, get_tokenizer
from tests.test_hf_export import varied_captions


def _random_texts(n: int, seed: int) -> list[str]:
    """Words of letters, digits, punctuation, accents, CJK, emoji, control characters, entities."""
    rng = random.Random(seed)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .,;:!?'\"-&#<>/\t\n\r\x07\x1b"
        "éèàüößñçÉÀ漢字かなカナ😀👍🏽–—“”‘’…€™\u00a0\u200b"
    )
    words = ["&amp;", "&lt;b&gt;", "<start_of_text>", "<end_of_text>", "'s", "don't", "café", "ÉCOLE"]
    texts = []
    for _ in range(n):
        parts = [
            rng.choice(words)
            if rng.random() < 0.2
            else "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
            for _ in range(rng.randint(0, 30))
        ]
        texts.append(" ".join(parts))
    return texts


def test_same_ids_as_open_clip_on_varied_and_random_captions():
    captions = varied_captions() + _random_texts(600, seed=1) + ["", " ", "a photo of a dog."]
    for length in (77, 16):
        reference = open_clip.SimpleTokenizer(context_length=length)(captions)
        ours = CLIPTokenizer(context_length=length)
        assert torch.equal(ours(captions), reference), length
        assert torch.equal(ours(captions), reference), "with every word remembered"
        assert (reference[:, -1] != 0).sum() > 20, "long captions are cut, ending in the end token"
    one = CLIPTokenizer()
    assert torch.equal(one("a photo of a dog."), open_clip.SimpleTokenizer()("a photo of a dog."))
    assert one([]).shape == (0, 77)


def test_plain_ascii_captions_skip_a_cleaning_that_would_change_nothing():
    """The shortcut's premise, on 20 000 random captions of printable ASCII without "&": ftfy and the
    HTML unescaping leave them unchanged, so open_clip's cleaning equals the shortcut's."""
    from open_clip.tokenizer import _clean_lower

    rng = random.Random(3)
    chars = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    for _ in range(20_000):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 60)))
        assert _clean_lower(text) == " ".join(text.split()).lower(), repr(text)


def test_the_memory_is_bounded_and_forgetting_changes_nothing():
    captions = _random_texts(300, seed=2)
    small = CLIPTokenizer(context_length=77, max_words=50)
    for _ in range(2):
        assert torch.equal(small(captions), open_clip.SimpleTokenizer(context_length=77)(captions))
        assert len(small.word_ids) <= 50


def test_workers_get_a_working_copy():
    """Loaders pickle the dataset (and its tokenizer) into each worker."""
    tokenizer = get_tokenizer(32)
    tokenizer(["warm the memory"])
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.context_length == 32 and torch.equal(copy(["a cat on a mat"]), tokenizer(["a cat on a mat"]))
