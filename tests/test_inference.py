"""clip_pl.load and the inference model: embeddings, zero-shot probabilities, inputs, errors.

pytest tests/test_inference.py
"""

from __future__ import annotations

import pytest
import torch

from clip_pl.inference import CLIPInference, load
from clip_pl.interchange import ArchitectureMismatchError
from tests.support.eval import (
    CLASSNAMES,
    TINY_RESNET,
    TINY_VIT,
    assert_same_weights,
    oracle_class_order,
    random_images,
    tiny_checkpoint,
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    checkpoint, model, config = tiny_checkpoint(tmp_path_factory.mktemp("inference") / "tiny.ckpt", seed=6)
    return checkpoint, model, config, load(checkpoint, device="cpu")


def test_load_returns_model_preprocess_tokenizer_for_the_classic_recipe(loaded):
    _, reference, _, (model, preprocess, tokenizer) = loaded
    assert isinstance(model, CLIPInference) and not model.training
    images = random_images(3, seed=1)
    batch = torch.stack([preprocess(im) for im in images])
    tokens = tokenizer(["a photo of a cat.", "a photo of a dog."])
    image_features, text_features = model.encode_image(batch), model.encode_text(tokens)
    torch.testing.assert_close(image_features.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        expected = reference.encode_image(batch, normalize=True)
    assert torch.equal(image_features, expected)
    # the seed usage: normalised features -> cosine similarity -> softmax, with the learned temperature
    probs = (model.logit_scale * image_features @ text_features.T).softmax(dim=-1)
    classified = model.zero_shot_classify(images, ["cat", "dog"])
    torch.testing.assert_close(classified, probs)
    torch.testing.assert_close(classified.sum(dim=1), torch.ones(3))
    logits_per_image, logits_per_text = model(images, ["a photo of a cat.", "a photo of a dog."])
    assert logits_per_image.shape == (3, 2) and torch.equal(logits_per_text, logits_per_image.T)


def test_zero_shot_classify_ranks_labels_as_computed_one_by_one(loaded):
    _, reference, config, (model, _, _) = loaded
    images = random_images(4, seed=2)
    expected = oracle_class_order(reference, config, images, CLASSNAMES, ["a photo of a {}."])
    probs = model.zero_shot_classify(images, CLASSNAMES)
    assert torch.equal(probs.argsort(dim=1, descending=True), expected)
    ensemble = ["a photo of a {}.", "a sketch of the {}"]
    expected = oracle_class_order(reference, config, images, CLASSNAMES, ensemble)
    assert torch.equal(
        model.zero_shot_classify(images, CLASSNAMES, template=ensemble).argsort(dim=1, descending=True), expected
    )


def test_images_may_be_paths_pil_or_tensors(loaded, tmp_path):
    _, _, _, (model, preprocess, _) = loaded
    image = random_images(1, seed=3)[0]
    image.save(tmp_path / "x.png")
    from_path = model.encode_image(tmp_path / "x.png")
    assert torch.equal(from_path, model.encode_image(image))
    assert torch.equal(from_path, model.encode_image(preprocess(image)))
    assert model.encode_text("a cat").shape == (1, 32)


def test_bad_labels_templates_and_images_are_clear_errors(loaded, tmp_path):
    _, _, _, (model, _, _) = loaded
    image = random_images(1)[0]
    with pytest.raises(ValueError, match=r"duplicated.*'cat': \[0, 2\]"):
        model.zero_shot_classify(image, ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="empty"):
        model.zero_shot_classify(image, [])
    with pytest.raises(ValueError, match="exactly one"):
        model.zero_shot_classify(image, ["cat", "dog"], template="a photo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.encode_image(tmp_path / "nope.png")


def test_bare_weights_load_with_an_architecture(loaded, tmp_path):
    _, reference, _, _ = loaded
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    model = load(tmp_path / "weights.pt", device="cpu", arch=TINY_VIT).model
    assert_same_weights(model.clip.state_dict(), reference.state_dict())
    with pytest.raises(ArchitectureMismatchError, match="do not fit"):
        load(tmp_path / "weights.pt", device="cpu", arch=TINY_RESNET)
    with pytest.raises(ValueError, match="arch="):
        load(tmp_path / "weights.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing.ckpt")
