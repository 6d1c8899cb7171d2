"""The LightningModule: encode both towers, contrast over the global batch, step AdamW.

Built by ``clip_pl.train`` from the Hydra config (``model``, ``loss``, ``optim``, ``scheduler``);
it holds no config parsing. The one file it may read is ``init_checkpoint`` (starting weights), and
only through ``clip_pl.interchange``, which owns every weights format. The open_clip model is ``self.model`` so its
state-dict keys in a checkpoint are ``model.<open_clip key>`` and ``clip_pl.load`` rebuilds it
from ``hparams.model_config`` alone.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_pl.data.device_decode import decode_batch
from clip_pl.data.device_resize import resize_batch
from clip_pl.model import build_clip, resolve_model_config, restore_scalar_shapes
from clip_pl.pixels import normalize
from clip_pl.towers import TOWER_LR_DEFAULTS, apply_lr_scales, base_lr, lock_towers, tower_parameter_groups

# Parameters that get no weight decay beyond ndim < 2 (biases, norm gains, class/positional
# vectors): norms by name, and the learned temperature and bias of the logits.
_NO_DECAY_NAME_PARTS = ("bias", "norm", "ln_", ".ln", "bn", "logit_scale", "logit_bias")


# The module normalises the loaders' uint8 pixels in on_after_batch_transfer by design; Lightning warns
# about any such hook when a datamodule is passed too.
warnings.filterwarnings(
    "ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule` but have passed.*"
)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or any(part in name for part in _NO_DECAY_NAME_PARTS)


class _CapScale(torch.autograd.Function):
    """``min(scale, cap)`` whose gradient above the cap still lets the scale come back down.

    A plain clamp gives zero gradient above the cap, so once Adam's momentum has carried the raw
    parameter past it, no gradient ever brings it back (open_clip avoids that with an in-place
    clamp after each step, which DeepSpeed's fp32 master weights would undo). Here the forward
    value never exceeds the cap under any strategy, and above it a gradient that would lower the
    scale passes (as if the scale sat at the cap) while one that would raise it further is dropped.
    """

    @staticmethod
    def forward(ctx, scale: torch.Tensor, cap: float) -> torch.Tensor:
        ctx.save_for_backward(scale >= cap)
        return scale.clamp(max=cap)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (at_cap,) = ctx.saved_tensors
        # Gradient descent lowers the scale where grad > 0; block only grad < 0 at the cap.
        return torch.where(at_cap & (grad < 0), torch.zeros_like(grad), grad), None


def cap_logit_scale(scale: torch.Tensor, cap: float) -> torch.Tensor:
    return _CapScale.apply(scale, cap)


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
        lock: Mapping[str, Any] | None = None,
        tower_lr: Mapping[str, float] | None = None,
    ):
        super().__init__()
        # Only plain values go into the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        self.model_config = dict(model_config)
        self.model = build_clip(self.model_config, grad_checkpointing=grad_checkpointing)
        if init_checkpoint:
            from clip_pl.interchange import load_open_clip_weights

            load_open_clip_weights(self.model, init_checkpoint)
        # Tower locking and per-tower / layer-wise learning rates: clip_pl.towers.
        self.tower_lr = {**TOWER_LR_DEFAULTS, **(tower_lr or {})}
        lock_towers(self.model, lock or {})
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.grad_cache_chunks = grad_cache_chunks
        self.max_logit_scale = float(max_logit_scale)
        # Decided now, on open_clip's own parameters: sharding wrappers may later change names,
        # shapes or ndim (FSDP1 flattens everything to 1-D), but not which parameter is which.
        self.no_decay_names = {name for name, p in self.model.named_parameters() if no_weight_decay(name, p)}
        if compile:
            # In place (nn.Module.compile): state-dict keys stay open_clip's and module hooks still run.
            self.model.compile()

    @classmethod
    def from_options(
        cls,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        tower_lr: Mapping[str, float] | None = None,  # conf/optim's tower keys (clip_pl.towers), from assembly
        *,
        arch: str | None = None,
        arch_config: Mapping[str, Any] | None = None,
        image_size: int | None = None,
        context_length: int | None = None,
        embed_dim: int | None = None,
        patch_dropout: float | None = None,
        init_logit_scale: float | None = None,
        init_logit_bias: float | None = None,
        grad_checkpointing: bool = False,
        grad_cache_chunks: int = 1,
        compile: bool = False,
        init_checkpoint: str | None = None,
        max_logit_scale: float = 100.0,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
    ) -> CLIPModule:
        """The ``model`` config group's schema: ``conf/model/_base.yaml`` names this as its ``_target_``
        (``_partial_: true``), so every key of a model choice is a keyword here, and an unknown key is
        refused by this signature before anything is built (``clip_pl.config_checks``). The
        architecture keys become an open_clip config (``resolve_model_config``); the rest are the
        module's own options. ``clip_pl.assembly.build_module`` adds the loss, optimizer and scheduler.
        """
        model_config = resolve_model_config(
            arch=arch,
            arch_config=arch_config,
            embed_dim=embed_dim,
            image_size=image_size,
            context_length=context_length,
            patch_dropout=patch_dropout,
            init_logit_scale=init_logit_scale,
            init_logit_bias=init_logit_bias,
        )
        return cls(
            model_config,
            loss,
            optimizer,
            scheduler,
            arch=arch,
            grad_checkpointing=grad_checkpointing,
            grad_cache_chunks=grad_cache_chunks,
            compile=compile,
            init_checkpoint=init_checkpoint,
            max_logit_scale=max_logit_scale,
            lock=dict(
                lock_image=lock_image,
                lock_image_unlocked_groups=lock_image_unlocked_groups,
                lock_text=lock_text,
                lock_text_unlocked_layers=lock_text_unlocked_layers,
            ),
            tower_lr=tower_lr,
        )

    def configure_model(self) -> None:
        """Sharded strategies (clip_pl.strategies) wrap or adapt the model here, before the optimizer
        sees any parameter: FSDP2 shards the towers, DeepSpeed needs 1-element scalars."""
        prepare = getattr(self.trainer.strategy, "prepare_model", None)
        if prepare is not None:
            prepare(self.model)

    # -- forward -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, texts: torch.Tensor):
        """The model's forward: L2-normalised image and text features, exp(logit_scale), logit_bias.

        Always through ``self.model(...)``: FSDP and ZeRO-3 gather parameters in forward hooks,
        which methods such as ``encode_text`` alone would bypass. With ``grad_cache_chunks = k > 1``
        the towers run on k chunks whose activations are not kept: each chunk is recomputed in the
        backward pass (GradCache-style feature caching), so tower memory is that of one chunk while
        the loss still sees all rows of all ranks.
        """
        if self.grad_cache_chunks == 1 or not torch.is_grad_enabled():
            return self._forward(images, texts)
        chunks = [
            checkpoint(self._forward, i, t, use_reentrant=False, context_fn=self._recompute_context)
            for i, t in zip(images.chunk(self.grad_cache_chunks), texts.chunk(self.grad_cache_chunks))
        ]
        image_features, text_features = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return image_features, text_features, *chunks[0][2:]

    def _forward(self, images: torch.Tensor, texts: torch.Tensor):
        out = self.model(images, texts)
        return out if len(out) == 4 else (*out, None)

    def _recompute_context(self):
        # The recompute of a chunk must not update BatchNorm running statistics a second time.
        return contextlib.nullcontext(), _frozen_batchnorm_statistics(self.model)

    def contrastive_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        image_features, text_features, scale, bias = self.encode(batch["image"], batch["text"])
        # The loss in fp32 under every precision and strategy: features renormalised in fp32 (a
        # no-op on fp32 unit vectors), fp32 temperature and bias, fp32 logits and cross-entropy.
        with torch.autocast(image_features.device.type, enabled=False):
            return self.loss(
                F.normalize(image_features.float(), dim=-1),
                F.normalize(text_features.float(), dim=-1),
                cap_logit_scale(scale.float().reshape(()), self.max_logit_scale),
                None if bias is None else bias.float().reshape(()),
            )

    def temperature(self) -> float:
        """exp(logit_scale) as the loss uses it (capped), read on any strategy."""
        return float(self._scalar_parameter("logit_scale", exp=True))

    # -- steps -------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Loaders ship uint8 pixels (a quarter of float32's bytes); they become the tower's normalised
        floats here, on the device, for training and validation alike. The float batch then gets the
        cast the precision plugin gives float inputs (bf16/fp16 under "-true" precisions, as before).
        A batch whose image is already floating (benchmarks' device-made batches) passes unchanged.
        With ``data.decode_on=device`` the batch brings JPEG bytes, decoded and cropped here first; with
        ``data.resize_on=device``, crops, resized here first."""
        if isinstance(batch, Mapping) and "jpeg" in batch:
            batch = decode_batch(batch)
        if isinstance(batch, Mapping) and "crop" in batch:
            batch = resize_batch(batch)
        image = batch.get("image") if isinstance(batch, Mapping) else None
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            image = normalize(image)
            if self._trainer is not None:
                image = self.trainer.precision_plugin.convert_input(image)
            batch = {**batch, "image": image}
        return batch

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.contrastive_loss(batch)
        batch_size = batch["image"].shape[0]
        world_size = self.trainer.world_size if self._trainer is not None else 1
        # sync_dist: the logged loss is the global-batch loss (the mean of the ranks' shares).
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log_dict(
            {
                # A device tensor, not a float: float() would wait for the GPU at every step (a host sync
                # that stops the CPU from queueing the next step); Lightning reads it on logging steps.
                "train/temperature": self._scalar_parameter("logit_scale", exp=True),
                "train/lr": self._current_lr(),
                "train/global_batch_size": float(batch_size * world_size),
                "train/world_size": float(world_size),
                # Row k of the metrics is the step that brings global_step to k, for every logger,
                # callback and checkpoint name (step=k.ckpt holds k steps). Lightning's own row counter
                # is off by one after a mid-step SLURM requeue; the optimizer step is not.
                "step": float(self.global_step + 1),
            },
            batch_size=batch_size,
        )
        if self.model.logit_bias is not None:
            self.log("train/logit_bias", self._scalar_parameter("logit_bias"), batch_size=batch_size)
        return loss

    def _scalar_parameter(self, name: str, exp: bool = False) -> torch.Tensor:
        """A 0-d parameter's value on every strategy (FSDP shards it as a 1-element DTensor), as a
        0-d fp32 tensor on the parameter's device."""
        value = getattr(self.model, name).detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        value = value.float().reshape(-1)[0].clone()
        return value.exp().clamp(max=self.max_logit_scale) if exp else value

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.contrastive_loss(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    def _current_lr(self) -> float:
        if self._trainer is None or not self.trainer.optimizers:
            return 0.0
        return base_lr(self.trainer.optimizers[0])

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A full state dict keeps open_clip's 0-d temperature/bias even where FSDP made them 1-D,
        # so every checkpoint loads into a plain open_clip model. (Sharded folders keep the live
        # shapes; `python -m clip_pl.interchange consolidate` restores these.)
        restore_scalar_shapes(checkpoint.get("state_dict", {}), prefix="model.")

    # -- optimisation ------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        if self.tower_lr != TOWER_LR_DEFAULTS:  # per-tower / per-depth groups, each with its lr_scale
            return tower_parameter_groups(
                self.model,
                ((_original_name(n), p) for n, p in self.model.named_parameters()),
                self.no_decay_names,
                self.tower_lr,
            )
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if _original_name(name) in self.no_decay_names else decay).append(param)
        # The decay group takes the optimizer's own weight_decay (clip_pl/conf/optim); the other gets none.
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        # Positional: torch's optimizers call it `params`, DeepSpeed's CPU Adam `model_params`.
        optimizer = self.optimizer_factory(self.parameter_groups())
        apply_lr_scales(optimizer)  # before the scheduler records each group's initial lr
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# Prefixes that wrappers (FSDP1, activation checkpointing, torch.compile) insert into names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _original_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@contextlib.contextmanager
def _frozen_batchnorm_statistics(model: nn.Module):
    """Restore every BatchNorm's running statistics on exit (they were updated in the forward)."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, mean, var, count in saved:
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
                module.num_batches_tracked.copy_(count)
