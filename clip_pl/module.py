"""The LightningModule: encode both towers, contrast over the global batch, step AdamW.

Built by ``clip_pl.train`` from the Hydra config (``model``, ``loss``, ``optim``, ``scheduler``);
it holds no config parsing and touches no files. The open_clip model is ``self.model`` so its
state-dict keys in a checkpoint are ``model.<open_clip key>`` and ``clip_pl.load`` rebuilds it
from ``hparams.model_config`` alone.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_pl.model import build_clip

# Parameters that get no weight decay beyond ndim < 2 (biases, norm gains, class/positional
# vectors): norms by name, and the learned temperature and bias of the logits.
_NO_DECAY_NAME_PARTS = ("bias", "norm", "ln_", ".ln", "bn", "logit_scale", "logit_bias")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or any(part in name for part in _NO_DECAY_NAME_PARTS)


class CLIPModule(L.LightningModule):
    def __init__(
        self,
        model_config: Mapping[str, Any],
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        arch: str | None = None,
        grad_checkpointing: bool = False,
        grad_cache_chunks: int = 1,
        compile: bool = False,
        init_checkpoint: str | None = None,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        # Only plain values go into the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        self.model_config = dict(model_config)
        self.model = build_clip(self.model_config, grad_checkpointing=grad_checkpointing)
        if init_checkpoint:
            from clip_pl.interchange import load_open_clip_weights

            load_open_clip_weights(self.model, init_checkpoint)
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.grad_cache_chunks = grad_cache_chunks
        self.max_log_scale = math.log(max_logit_scale)
        self.bad_sample_counts: Counter[str] = Counter()
        self._encode_image, self._encode_text = self.model.encode_image, self.model.encode_text
        if compile:
            # Compile the tower functions, not the module, so state-dict keys stay open_clip's.
            self._encode_image = torch.compile(self.model.encode_image)
            self._encode_text = torch.compile(self.model.encode_text)

    # -- forward -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text features.

        With ``grad_cache_chunks = k > 1`` the towers run on k chunks whose activations are not
        kept: each chunk is recomputed in the backward pass (GradCache-style feature caching),
        so tower memory is that of one chunk while the loss still sees all rows of all ranks.
        """
        if self.grad_cache_chunks == 1 or not torch.is_grad_enabled():
            return self._encode_pair(images, texts)
        chunks = [checkpoint(self._encode_pair, i, t, use_reentrant=False)
                  for i, t in zip(images.chunk(self.grad_cache_chunks), texts.chunk(self.grad_cache_chunks))]
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def _encode_pair(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self._encode_image(images), dim=-1), F.normalize(self._encode_text(texts), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        # Capped where it is used, not by an in-place clamp after the step: under DeepSpeed the
        # fp32 master weights would overwrite such a clamp; this cap holds under every strategy.
        return self.model.logit_scale.clamp(max=self.max_log_scale).exp()

    def contrastive_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        image_features, text_features = self.encode(batch["image"], batch["text"])
        return self.loss(image_features, text_features, self.logit_scale(), self.model.logit_bias)

    # -- steps -------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        self.bad_sample_counts.update(batch.get("bad_samples") or {})
        loss = self.contrastive_loss(batch)
        batch_size = batch["image"].shape[0]
        world_size = self.trainer.world_size if self._trainer is not None else 1
        # sync_dist: the logged loss is the global-batch loss (the mean of the ranks' shares).
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log_dict({
            "train/temperature": self.logit_scale().detach(),
            "train/lr": self._current_lr(),
            "train/global_batch_size": float(batch_size * world_size),
            "train/world_size": float(world_size),
            # Row k of the metrics is the step that brings global_step to k, for every logger,
            # callback and checkpoint name (step=k.ckpt holds k steps). Lightning's own row counter
            # is off by one after a mid-step SLURM requeue; the optimizer step is not.
            "step": float(self.global_step + 1),
        }, batch_size=batch_size)
        if self.model.logit_bias is not None:
            self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=batch_size)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.contrastive_loss(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if (self.global_step + 1) % self.trainer.log_every_n_steps:
            return  # only on steps whose metrics reach the loggers: the norm is a pass over all grads
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:  # sharded strategies may hold no full gradients here; they report their own
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def _current_lr(self) -> float:
        if self._trainer is None or not self.trainer.optimizers:
            return 0.0
        return float(self.trainer.optimizers[0].param_groups[0]["lr"])

    # -- optimisation ------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if no_weight_decay(name, param) else decay).append(param)
        # The decay group takes the optimizer's own weight_decay (conf/optim); the other gets none.
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
