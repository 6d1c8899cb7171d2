"""Use a trained model: load a checkpoint, embed images and texts, classify with words.

    import clip_pl
    from PIL import Image
    model, preprocess, tokenizer = clip_pl.load("runs/x/checkpoints/last.ckpt")
    probs = model.zero_shot_classify(Image.open("cat.jpg"), ["cat", "dog", "car"])   # (1, 3), rows sum to 1

    # the classic recipe, spelled out
    image = preprocess(Image.open("cat.jpg")).unsqueeze(0)
    text = tokenizer(["a photo of a cat.", "a photo of a dog."])
    image_features = model.encode_image(image)          # L2-normalised
    text_features = model.encode_text(text)
    probs = (model.logit_scale * image_features @ text_features.T).softmax(dim=-1)

``load`` reads a clip_pl training checkpoint (architecture taken from it), a directory written by
``clip_pl.interchange.export_open_clip``, or any open_clip/OpenAI weights file when ``arch=`` names
its open_clip architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import nn

from clip_pl.eval.labels import check_templates, check_unique
from clip_pl.interchange import build_from_checkpoint, read_model_checkpoint
from clip_pl.model import context_length_of, get_tokenizer, image_size_of, image_transforms

ImageInput = torch.Tensor | Image.Image | str | Path | Sequence[Image.Image | str | Path]


class CLIPInference(nn.Module):
    """An open_clip CLIP in eval mode, with its preprocessing and tokenizer, taking raw inputs."""

    def __init__(self, clip: nn.Module, model_config: Mapping[str, Any]):
        super().__init__()
        self.clip = clip.eval()
        self.model_config = dict(model_config)
        self.preprocess = image_transforms(image_size_of(model_config))[1]
        self.tokenizer = get_tokenizer(context_length_of(model_config))
        self.eval()  # dropout / patch dropout off; call .train() explicitly to fine-tune

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.parameters()).dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(learned temperature): the factor between cosine similarity and logits."""
        return self.clip.logit_scale.detach().exp()

    def _image_batch(self, images: ImageInput) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            batch = images if images.ndim == 4 else images.unsqueeze(0)
            if batch.ndim != 4:
                raise ValueError(f"image tensor of shape {tuple(images.shape)}: expected (3, H, W) or (N, 3, H, W).")
        else:
            items = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
            if not items:
                raise ValueError("no images given.")
            batch = torch.stack([self.preprocess(_open_image(item)) for item in items])
        return batch.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_image(self, images: ImageInput, normalize: bool = True) -> torch.Tensor:
        """(N, D) image embeddings of PIL images, paths, or already-preprocessed tensors."""
        return self.clip.encode_image(self._image_batch(images), normalize=normalize)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(N, D) text embeddings of strings or of tokens from ``tokenizer``."""
        if isinstance(texts, torch.Tensor):
            tokens = texts if texts.ndim == 2 else texts.unsqueeze(0)
        else:
            texts = [texts] if isinstance(texts, str) else list(texts)
            if not texts:
                raise ValueError("no texts given.")
            tokens = self.tokenizer(texts)
        return self.clip.encode_text(tokens.to(self.device), normalize=normalize)

    @torch.no_grad()
    def class_embeddings(
        self, labels: Sequence[str], template: str | Sequence[str] = "a photo of a {}."
    ) -> torch.Tensor:
        """(L, D) unit vectors, one per label; several templates are averaged on the unit sphere."""
        labels = check_unique([labels] if isinstance(labels, str) else list(labels), "labels")
        templates = check_templates([template] if isinstance(template, str) else list(template))
        features = self.encode_text([t.format(label) for label in labels for t in templates])
        features = features.reshape(len(labels), len(templates), -1).mean(dim=1)
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def zero_shot_classify(
        self, images: ImageInput, labels: Sequence[str], template: str | Sequence[str] = "a photo of a {}."
    ) -> torch.Tensor:
        """(N, L) probabilities over ``labels``: softmax of logit_scale × cosine(image, prompt)."""
        classes = self.class_embeddings(labels, template)
        logits = self.logit_scale * self.encode_image(images) @ classes.T
        return logits.float().softmax(dim=-1)

    @torch.no_grad()
    def forward(
        self, images: ImageInput, texts: str | Sequence[str] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text), as OpenAI's CLIP returns them."""
        logits = self.logit_scale * self.encode_image(images) @ self.encode_text(texts).T
        return logits, logits.T


class Loaded(NamedTuple):
    model: CLIPInference
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]


def _open_image(item: Image.Image | str | Path) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist.")
    with Image.open(path) as image:
        return image.convert("RGB")


def load(
    checkpoint: str | Path, device: str | torch.device | None = None, arch: str | Mapping[str, Any] | None = None
) -> Loaded:
    """(model, preprocess, tokenizer) from a clip_pl checkpoint, an exported open_clip directory,
    or an open_clip/OpenAI weights file with ``arch`` (an open_clip name or a config dict).

    Raises FileNotFoundError for a missing path and ArchitectureMismatchError (a ValueError) when
    the weights do not fit the architecture. Files are read with ``torch.load(weights_only=True)``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = read_model_checkpoint(checkpoint, arch)
    model = CLIPInference(build_from_checkpoint(loaded), loaded.model_config).to(device)
    return Loaded(model, model.preprocess, model.tokenizer)
