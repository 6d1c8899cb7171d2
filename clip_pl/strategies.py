"""Strategy builders: what a YAML file cannot say (module classes, CPU shims, the sharding plan).

    strategy=ddp                         Lightning's DDPStrategy (clip_pl/conf/strategy/ddp.yaml)
    strategy=deepspeed_stage_{1,2,3}     deepspeed_strategy(): Lightning's DeepSpeedStrategy
    strategy=fsdp                        FSDP2Strategy: fully_shard per tower block, via ModelParallelStrategy

On GPUs these are Lightning's own strategies, unchanged. On CPU (tests, this project's CI) two narrow
shims make the same code paths run on gloo: DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``)
behind a DeepSpeedStrategy subclass that skips Lightning's CUDA-only checks, and nothing at all for
FSDP2, which runs on gloo as it is.

Mixed precision is the same under every strategy: parameters (the temperature and the SigLIP bias
among them) stay fp32, the towers' matmuls run under ``torch.autocast``, gradients are reduced in
fp32 unless ``reduce_dtype`` says otherwise, and the loss is computed in fp32 (``module.py``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from open_clip.modified_resnet import Bottleneck
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from clip_pl.model import SCALAR_PARAMETERS

# The repeated blocks of both towers: each becomes one FSDP unit.
TOWER_BLOCKS = (ResidualAttentionBlock, Bottleneck)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"reduce_dtype={name!r}: choose one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def _runs_on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


# --------------------------------------------------------------------------- DeepSpeed


class ClipDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, plus the one preparation open_clip models need: DeepSpeed
    broadcasts parameters as byte views at start, which 0-d tensors (the temperature) cannot give."""

    def prepare_model(self, model: nn.Module) -> None:
        promote_scalar_parameters(model)
        return_parameter_copies(model)


class CPUDeepSpeedStrategy(ClipDeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy on CPU processes: DeepSpeed's CPU accelerator over gloo.

    Lightning refuses any accelerator but CUDA in ``setup_environment`` and checks device indices
    in ``setup_distributed``; DeepSpeed itself runs on CPU. Only those two checks are skipped, and
    ``root_device`` carries the local rank as its index because Lightning passes
    ``root_device.index`` to ``deepspeed.initialize`` as the device rank. Everything else
    (engine, ZeRO partitioning, checkpoints) is Lightning's and DeepSpeed's own code.
    """

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's override only adds the CUDA check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)


def deepspeed_strategy(
    stage: int,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    precision: str = "32",
    reduce_dtype: str = "float32",
    accelerator: str = "auto",
    **kwargs: Any,
) -> DeepSpeedStrategy:
    """DeepSpeed ZeRO ``stage`` with clip_pl's precision policy.

    ``bf16-mixed`` uses DeepSpeed's ``torch_autocast`` mode, not its ``bf16`` mode: the latter casts
    the whole module to bf16, so the temperature would be a bf16 number (cap 98.9, steps of 1.6-3 %)
    and norms, logits and cross-entropy would run in bf16. Memory per parameter is the same 16
    bytes either way (fp32 weight + fp32 grad + Adam's two moments, against bf16 weight + bf16 grad
    + fp32 master + moments). ``reduce_dtype=bfloat16`` sends Linear/Conv gradients in bf16.
    """
    if precision in ("16-mixed", "16", "16-true", "bf16-true", "bf16"):
        raise ValueError(
            f"strategy=deepspeed_* with trainer.precision={precision}: use bf16-mixed (fp32 "
            f"weights, bf16 matmuls) or 32."
        )
    cls = ClipDeepSpeedStrategy
    if _runs_on_cpu(accelerator):
        # Must be set before deepspeed is first imported: it picks its accelerator once, at import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                f"DeepSpeed was imported with its {get_accelerator().device_name()!r} accelerator "
                f"before the CPU strategy was built; set DS_ACCELERATOR=cpu in the environment."
            )
        cls = CPUDeepSpeedStrategy
    strategy = cls(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters, **kwargs)
    if precision == "bf16-mixed":
        # Lightning adds DeepSpeed's own "bf16" section only where the config has none.
        strategy.config["bf16"] = {"enabled": False}
        strategy.config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": []
            if _dtype(reduce_dtype) == torch.float32
            else ["torch.nn.Linear", "torch.nn.Conv2d"],
        }
    return strategy


# --------------------------------------------------------------------------- FSDP2


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Lightning's ModelParallelStrategy with a 1-D data-parallel mesh over every rank; the module's
    ``configure_model`` hands the open_clip model to :meth:`prepare_model`, which makes each tower block one
    FSDP unit and the model the root. FSDP2 keeps parameter names and shapes (DTensors), so
    weight-decay groups, gradient norms and clipping see the real parameters. It runs on gloo
    unchanged; Lightning's FSDP1 ``FSDPStrategy`` refuses CPU and FSDP1 flattens parameters.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        reduce_dtype: str = "float32",
        state_dict_type: str = "full",
        **kwargs: Any,
    ):
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(
                f"strategy.state_dict_type={state_dict_type!r}: choose full (one file, gathered "
                f"on rank 0) or sharded (a folder, each rank writes its shard)."
            )
        super().__init__(save_distributed_checkpoint=state_dict_type == "sharded", **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.reduce_dtype = _dtype(reduce_dtype)

    def setup_environment(self) -> None:
        # Pure data parallel: one mesh dimension over all ranks (the parent's "auto" would split
        # nodes × devices into data × tensor parallel).
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def prepare_model(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if any(getattr(m, "_is_fsdp_managed_module", False) for m in model.modules()):
            return  # configure_model may run again (fit after validate): shard once
        promote_scalar_parameters(model)
        return_parameter_copies(model)
        mesh = self.device_mesh["data_parallel"]
        # param_dtype None: parameters stay fp32 and autocast picks the matmul dtype, as under DDP.
        policy = MixedPrecisionPolicy(reduce_dtype=self.reduce_dtype)
        for module in list(model.modules()):
            if isinstance(module, TOWER_BLOCKS):
                fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        # The root gathers the rest (text embeddings, projections, temperature) around forward()
        # only: callers go through model(images, texts), never encode_image/encode_text alone.
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)


def promote_scalar_parameters(model: nn.Module) -> None:
    """Turn open_clip's 0-d parameters into 1-element vectors, in place: FSDP shards along dim 0
    and refuses scalars, DeepSpeed broadcasts byte views that scalars cannot give.

    Full checkpoints keep open_clip's 0-d shape (``CLIPModule.on_save_checkpoint``); a load hook
    reshapes them back on the way in, so any full checkpoint resumes under any strategy.
    """
    promoted = False
    for name in SCALAR_PARAMETERS:
        param = getattr(model, name, None)
        if isinstance(param, nn.Parameter) and param.ndim == 0:
            setattr(model, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            promoted = True
    if promoted:
        model.register_load_state_dict_pre_hook(_reshape_scalars_on_load)


def return_parameter_copies(model: nn.Module) -> None:
    """Make ``model``'s forward return copies of any parameter it returns as such, once.

    open_clip's forward returns the logit_bias parameter itself. FSDP2 and ZeRO-3 free the gathered
    parameter when forward ends, so the caller would hold freed storage (FSDP2 on gloo: a segfault
    in the SigLIP loss). The hook runs before their own post-forward hooks.
    """
    if not getattr(model, "_clip_pl_returns_parameter_copies", False):
        model.register_forward_hook(_copy_parameter_outputs, prepend=True)
        model._clip_pl_returns_parameter_copies = True


def _copy_parameter_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    """Outputs that are parameters become copies (differentiable: gradients still reach them)."""
    if isinstance(output, tuple):
        return tuple(o.clone() if isinstance(o, nn.Parameter) else o for o in output)
    return output


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` runs DeepSpeed (its engine, its folder checkpoints, its own grad norm)."""
    return isinstance(strategy, DeepSpeedStrategy)


def _reshape_scalars_on_load(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for name in SCALAR_PARAMETERS:
        key, live = prefix + name, getattr(module, name, None)
        if key in state_dict and live is not None and state_dict[key].ndim == 0 and live.ndim == 1:
            value = state_dict[key].reshape(1)
            if hasattr(live, "device_mesh"):  # an FSDP2 DTensor: hand over the value sharded like it
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(live.device), live.device_mesh, live.placements)
            state_dict[key] = value
