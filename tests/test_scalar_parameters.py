"""open_clip's 0-d temperature and bias: one helper restores their shape for every checkpoint path."""

from __future__ import annotations

import torch

from clip_pl.model import restore_scalar_shapes


def test_restore_scalar_shapes_reshapes_only_one_element_scalars():
    state = {
        "model.logit_scale": torch.tensor([2.5]),
        "model.logit_bias": torch.tensor([-10.0]),
        "model.visual.proj": torch.ones(1),
        "logit_scale": torch.tensor([1.0]),
    }
    restore_scalar_shapes(state, prefix="model.")
    assert state["model.logit_scale"].shape == () and float(state["model.logit_scale"]) == 2.5
    assert state["model.logit_bias"].shape == ()
    assert state["model.visual.proj"].shape == (1,)  # not a scalar parameter
    assert state["logit_scale"].shape == (1,)  # another prefix


def test_a_consolidated_sharded_folder_has_open_clip_scalar_shapes(tmp_path):
    # A torch.distributed.checkpoint folder (what FSDP's sharded state_dict_type writes), from one process.
    import torch.distributed.checkpoint as dcp

    from clip_pl.interchange import consolidate_checkpoint

    state = {
        "state_dict": {"model.logit_scale": torch.tensor([2.5]), "model.text_projection": torch.ones(2, 2)},
        "hyper_parameters": {"arch": "tiny"},
    }
    dcp.save(state, checkpoint_id=str(tmp_path / "sharded"))
    out = consolidate_checkpoint(tmp_path / "sharded", tmp_path / "one.ckpt")
    loaded = torch.load(out, weights_only=True)
    assert loaded["state_dict"]["model.logit_scale"].shape == ()
    assert loaded["state_dict"]["model.text_projection"].shape == (2, 2)
