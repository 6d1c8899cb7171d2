"""An exponential moving average (EMA) of the weights, kept in the checkpoint.

    python -m clip_pl.train debug=smoke callbacks.ema.enabled=true callbacks.ema.decay=0.99
    python -m clip_pl.train experiment=demo callbacks.ema.enabled=true callbacks.ema.evaluate_with_ema=true
    python -m clip_pl.interchange export RUN/checkpoints/last.ckpt out_dir --ema    # the EMA weights

After optimizer step k (``global_step`` = k): ``ema = θ_k`` while k <= ``start_step``, then
``ema = decay · ema + (1 − decay) · θ_k``. The EMA is fp32, on the parameters' device, one entry per
floating parameter of the open_clip model (``pl_module.model``, open_clip names). Under DDP every
rank holds the same full EMA (the ranks hold the same weights). Sharded strategies (FSDP, DeepSpeed)
hold only a shard of each parameter per rank: refused before the run starts.

The callback's ``state_dict`` (the EMA tensors and the step they are at) is stored by Lightning in the
checkpoint under ``callbacks``; a resumed run continues the same recursion bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch

from clip_pl.interchange import EMA_STATE_KEY  # where export (--ema) finds the EMA in a checkpoint


def check_ema_options(decay: Any, start_step: Any, sharded: str | None = None) -> None:
    if not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
        raise ValueError(f"callbacks.ema.decay={decay!r} must be in (0, 1), e.g. 0.999.")
    if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
        raise ValueError(f"callbacks.ema.start_step={start_step!r} must be an integer >= 0.")
    if sharded:
        raise ValueError(
            f"callbacks.ema: strategy {sharded} shards the parameters over the ranks, and clip_pl's EMA "
            f"holds full tensors per rank (tested under DDP only). Use strategy=ddp or "
            f"callbacks.ema.enabled=false."
        )


class EMA(L.Callback):
    def __init__(
        self, enabled: bool = False, decay: float = 0.9999, start_step: int = 0, evaluate_with_ema: bool = False
    ):
        self.enabled = bool(enabled)
        if self.enabled:
            check_ema_options(decay, start_step)
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.evaluate_with_ema = bool(evaluate_with_ema)
        self.ema: dict[str, torch.Tensor] | None = None
        self.step = -1  # the global step the EMA is at (-1: not started)

    @property
    def state_key(self) -> str:
        return EMA_STATE_KEY  # one EMA per run: a fixed key that export can find in the checkpoint

    # -- the recursion -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        if isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)) or not isinstance(
            strategy, (DDPStrategy, SingleDeviceStrategy)
        ):
            check_ema_options(self.decay, self.start_step, sharded=type(strategy).__name__)

    @staticmethod
    def _parameters(pl_module: L.LightningModule) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in pl_module.model.named_parameters() if p.is_floating_point())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.enabled or step <= self.step:  # no optimizer step happened on this batch
            return
        self.update(pl_module, step)

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule, step: int) -> None:
        params = dict(self._parameters(pl_module))
        if self.ema is None or step <= self.start_step:
            self.ema = {n: p.detach().float().clone() for n, p in params.items()}
        else:
            self._to_device(params)
            names = list(params)
            emas = [self.ema[n] for n in names]
            # ema = decay·ema + (1 − decay)·θ, in fp32 (lerp: ema + (1 − decay)·(θ − ema))
            torch._foreach_lerp_(emas, [params[n].detach().float() for n in names], 1.0 - self.decay)
        self.step = step

    def _to_device(self, params: Mapping[str, torch.Tensor]) -> None:
        assert self.ema is not None
        for name, value in self.ema.items():
            if value.device != params[name].device:
                self.ema[name] = value.to(params[name].device)

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.enabled or self.ema is None:
            return {}
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "step": self.step,
            "ema": {n: t.detach().clone() for n, t in self.ema.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.enabled or not state_dict:
            return
        self.ema = {n: t.float() for n, t in state_dict["ema"].items()}
        self.step = int(state_dict["step"])

    # -- evaluation with the EMA weights ------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self, pl_module: L.LightningModule):
        """The EMA weights in the model for the duration of the block, the trained ones after."""
        if not self.enabled or self.ema is None:
            yield
            return
        params = dict(self._parameters(pl_module))
        self._to_device(params)
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(backup[name])


def evaluation_weights(trainer: L.Trainer, pl_module: L.LightningModule):
    """A context: the EMA weights if an enabled EMA callback asks for evaluation with them, else nothing."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA) and callback.enabled and callback.evaluate_with_ema:
            return callback.swapped_in(pl_module)
    return contextlib.nullcontext()
