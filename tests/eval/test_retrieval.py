"""Retrieval evaluation end to end on image-caption shards, against embeddings computed one by one.

pytest tests/eval/test_retrieval.py
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from clip_pl.callbacks.evaluation import RetrievalCallback
from clip_pl.eval.retrieval import retrieval_evaluate, retrieval_recall
from clip_pl.model import get_tokenizer, image_transforms
from tests.support.eval import CAPTION_COUNTS, caption_samples, captions_for, random_images, tiny_model, write_shards


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    model, config = tiny_model(seed=2)
    captions = captions_for()
    samples = caption_samples(random_images(len(CAPTION_COUNTS), seed=3), captions)
    shards = write_shards(root, samples, num_shards=2)
    # the reference sees the images as stored (half of them are lossy JPEGs)
    images = [Image.open(io.BytesIO(s.get("jpg") or s["png"])).convert("RGB") for s in samples]
    return {"model": model, "config": config, "images": images, "captions": captions, "shards": shards}


@torch.no_grad()
def expected_recall(case, ks):
    model = case["model"]
    preprocess, tokenizer = image_transforms(32)[1], get_tokenizer(16)
    image_features = torch.cat([model.encode_image(preprocess(im)[None], normalize=True) for im in case["images"]])
    texts, owner = [], []
    for i, caps in enumerate(case["captions"]):
        for cap in caps:
            texts.append(model.encode_text(tokenizer([cap]), normalize=True))
            owner.append(i)
    return retrieval_recall(image_features, torch.cat(texts), torch.tensor(owner), ks=ks)


def test_recall_on_shards_matches_one_by_one_embeddings(captioned):
    ks = (1, 2, 5)
    result = retrieval_evaluate(
        captioned["model"], captioned["config"], captioned["shards"], batch_size=3, ks=ks, chunk_size=4
    )
    expected = expected_recall(captioned, ks)
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    assert result["images"] == 10 and result["captions"] == 13 and result["images_without_caption"] == 1
    assert result["image_to_text_R@5"] > result["image_to_text_R@1"]  # not all-or-nothing


def test_one_caption_per_sample_when_no_separator(captioned):
    result = retrieval_evaluate(
        captioned["model"], captioned["config"], captioned["shards"], batch_size=4, caption_separator=None, ks=(1,)
    )
    assert result["captions"] == 9 and result["images_without_caption"] == 1  # multi-line texts are one caption


def test_retrieval_callback_checks_its_settings(captioned, tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        RetrievalCallback(data=str(tmp_path))
    with pytest.raises(ValueError, match="must be positive"):
        RetrievalCallback(data=captioned["shards"], ks=(0, 5))
    callback = RetrievalCallback(data=captioned["shards"], ks=[1, 5], batch_size=4, num_workers=0)
    result = callback.evaluate(captioned["model"], captioned["config"])
    expected = expected_recall(captioned, (1, 5))
    assert set(expected) == {"image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5"}
    assert {k: result[k] for k in expected} == pytest.approx(expected), "the callback's numbers, not just its keys"
