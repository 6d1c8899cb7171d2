"""Checkpoints are written atomically, and a restarted run picks the newest one of its directory."""

from __future__ import annotations

import os
import time

import pytest
import torch

from clip_pl.assembly import wandb_run_id
from clip_pl.checkpointing import AtomicCheckpointIO, find_resume_checkpoint


class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("simulated crash in the middle of writing")


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 10, "weights": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        io.save_checkpoint({"global_step": 20, "weights": torch.zeros(1000), "bad": ExplodesWhenPickled()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 10
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left behind


def test_resume_picks_the_newest_of_last_and_slurm_requeue_checkpoints(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert find_resume_checkpoint(tmp_path) == str(last)
    time.sleep(0.01)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    assert find_resume_checkpoint(tmp_path) == str(hpc)


def test_the_wandb_run_id_is_stable_per_run_directory(tmp_path):
    a, b = tmp_path / "runs" / "1234", tmp_path / "other" / "1234"
    assert wandb_run_id(a) == wandb_run_id(a)  # a requeued job continues the same W&B run
    assert wandb_run_id(a) != wandb_run_id(b)  # another run directory never collides


def test_a_fresh_start_refuses_a_run_directory_that_has_checkpoints(tmp_path):
    from omegaconf import OmegaConf

    from clip_pl.assembly import resume_checkpoint

    cfg = OmegaConf.create({"resume": "none"})
    assert resume_checkpoint(cfg, tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="resume=auto"):
        resume_checkpoint(cfg, tmp_path)
