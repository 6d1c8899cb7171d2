"""The smallest open_clip tower config the loss and module tests share, and a batch for it."""

from __future__ import annotations

import torch

TINY = dict(
    embed_dim=8,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(context_length=8, vocab_size=1000, width=32, heads=2, layers=1),
)


def make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 16, 16, generator=gen)
    texts = torch.randint(1, 998, (n, 8), generator=gen)
    texts[:, -1] = 999  # the EOT token is the highest id: open_clip pools at argmax
    return images, texts
