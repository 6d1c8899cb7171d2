"""clip_pl: multi-node CLIP pre-training (WebDataset → Lightning → Hydra → SLURM).

import clip_pl
model, preprocess, tokenizer = clip_pl.load("runs/<run>/checkpoints/last.ckpt")
probs = model.zero_shot_classify(images, ["cat", "dog"], template="a photo of a {}.")
"""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
    # Lazy: `import clip_pl` stays cheap for data_prep-style tools and for spawned workers.
    if name == "load":
        from clip_pl.inference import load

        return load
    raise AttributeError(f"module 'clip_pl' has no attribute {name!r}")
