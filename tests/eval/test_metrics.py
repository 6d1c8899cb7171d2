"""The evaluation arithmetic on cases whose answers are worked out by hand: top-k, recall@k,
prompt ensembling, class-name / template files.

    pytest tests/eval/test_metrics.py
"""

from __future__ import annotations

import pytest
import torch

from clip_pl.eval.labels import load_classnames, load_templates
from clip_pl.eval.report import format_table
from clip_pl.eval.retrieval import retrieval_recall
from clip_pl.eval.zeroshot import build_classifier, topk_hits
from clip_pl.model import get_tokenizer
from tests.support.eval import tiny_model

# Scores of 5 images (rows) against 5 captions (columns); caption j describes image OWNER[j].
# Image 4 has no caption (a gallery item only); its scores are below everything.
SCORES = torch.tensor(
    [
        [0.2, 0.9, 0.5, 0.1, 0.3],  # image 0, captions 0 and 1: best positive 0.9 -> rank 0
        [0.8, 0.7, 0.6, 0.9, 0.1],  # image 1, caption 2 (0.6): 0.8, 0.7, 0.9 beat it -> rank 3
        [0.1, 0.2, 0.3, 0.4, 0.5],  # image 2, caption 3 (0.4): 0.5 -> rank 1
        [0.9, 0.8, 0.7, 0.6, 0.1],  # image 3, caption 4 (0.1): four beat it -> rank 4
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)
OWNER = torch.tensor([0, 0, 1, 2, 3])
# caption ranks (columns vs their image): 0:(0.2 < 0.8, 0.9) 2 · 1: 0 · 2:(0.6 < 0.7) 1 · 3:(0.4 < 0.9, 0.6) 2 · 4: 2
EXPECTED = {
    "image_to_text_R@1": 1 / 4,
    "image_to_text_R@2": 2 / 4,
    "image_to_text_R@4": 3 / 4,
    "image_to_text_R@5": 4 / 4,
    "text_to_image_R@1": 1 / 5,
    "text_to_image_R@2": 2 / 5,
    "text_to_image_R@4": 5 / 5,
    "text_to_image_R@5": 5 / 5,
}


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1024])
def test_recall_at_k_on_known_ranks(chunk_size):
    # One-hot image features make image_features @ text_features.T equal SCORES exactly.
    result = retrieval_recall(torch.eye(5), SCORES.T.contiguous(), OWNER, ks=(1, 2, 4, 5), chunk_size=chunk_size)
    assert result == pytest.approx(EXPECTED)


def test_recall_matches_a_full_sort_on_random_embeddings():
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=1)
    owner = torch.randint(0, 40, (90,), generator=gen)
    texts = torch.nn.functional.normalize(images[owner] + 1.5 * torch.randn(90, 8, generator=gen), dim=1)
    scores = images @ texts.T
    order_t = scores.argsort(dim=1, descending=True)  # image -> texts
    i2t_rank = torch.tensor(
        [
            min(int((order_t[i] == j).nonzero()) for j in (owner == i).nonzero().flatten())
            for i in range(40)
            if (owner == i).any()
        ]
    )
    order_i = scores.T.argsort(dim=1, descending=True)  # text -> images
    t2i_rank = torch.tensor([int((order_i[j] == owner[j]).nonzero()) for j in range(90)])
    result = retrieval_recall(images, texts, owner, ks=(1, 5, 10), chunk_size=7)
    for k in (1, 5, 10):
        assert result[f"image_to_text_R@{k}"] == pytest.approx(float((i2t_rank < k).float().mean()))
        assert result[f"text_to_image_R@{k}"] == pytest.approx(float((t2i_rank < k).float().mean()))


def test_topk_hits_counts_label_among_highest_logits():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.2, 0.1], [0.0, 0.1, 0.2]])
    labels = torch.tensor([2, 0, 0])
    # top-1: only row 1; top-2: rows 0, 1; top-5 is capped at the 3 classes: all rows
    assert topk_hits(logits, labels, ks=(1, 2, 5)).tolist() == [1, 2, 3]


def test_class_embeddings_are_template_means_on_the_unit_sphere():
    model, config = tiny_model()
    tokenizer = get_tokenizer(16)
    classes, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "art of the {}", "{}"]
    classifier = build_classifier(model, tokenizer, classes, templates, embed_dim=32, classes_per_batch=2)
    assert classifier.shape == (32, 3)
    with torch.no_grad():
        for c, name in enumerate(classes):
            prompts = torch.stack([model.encode_text(tokenizer([t.format(name)]))[0] for t in templates])
            mean = (prompts / prompts.norm(dim=1, keepdim=True)).mean(dim=0)
            torch.testing.assert_close(classifier[:, c], mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_builtin_classnames_and_templates_come_from_open_clip():
    names, templates = load_classnames("imagenet"), load_templates("openai_imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
    assert len(load_templates("simple_imagenet")) == 7


def test_class_and_template_files(tmp_path):
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\n\n")
    assert load_classnames(str(tmp_path / "classes.txt")) == ["zero", "one", "two"]
    (tmp_path / "dups.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"duplicated.*'cat': \[0, 2\]"):
        load_classnames(str(tmp_path / "dups.txt"))
    with pytest.raises(ValueError, match="duplicated"):
        load_classnames(["a", "b", "a"])
    (tmp_path / "gap.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match=r"blank line\(s\) \[2\]"):
        load_classnames(str(tmp_path / "gap.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classnames(str(tmp_path / "missing.txt"))
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of {}\n")
    assert load_templates(str(tmp_path / "templates.txt")) == ["a photo of a {}.", "a drawing of {}"]
    with pytest.raises(ValueError, match="exactly one '{}'"):
        load_templates(["a photo of a cat"])


def test_table_shows_rates_as_percentages():
    table = format_table({"digits": {"top1": 0.5, "top5": 1.0, "samples": 20}})
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "value"]
    assert "50.00 %" in lines[2] and "100.00 %" in lines[3] and lines[4].split()[-1] == "20"
