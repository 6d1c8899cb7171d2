"""Checkpoints are written atomically, and a restarted run picks the newest one of its directory."""

from __future__ import annotations

import os

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


def _touch(path, mtime: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))  # explicit times: no sleep, no reliance on the file system's clock resolution
    return str(path)


@pytest.mark.parametrize("newest", ["last", "hpc_ckpt_1", "hpc_ckpt_2"])
def test_resume_picks_the_newest_of_last_and_slurm_requeue_checkpoints(tmp_path, newest):
    assert find_resume_checkpoint(tmp_path) is None
    times = {"last": 1_000.0, "hpc_ckpt_1": 2_000.0, "hpc_ckpt_2": 3_000.0}
    times[newest] = 9_000.0  # each candidate in turn is the newest, whatever its name or its place in a listing
    paths = {
        "last": _touch(tmp_path / "checkpoints" / "last.ckpt", times["last"]),
        "hpc_ckpt_1": _touch(tmp_path / "hpc_ckpt_1.ckpt", times["hpc_ckpt_1"]),
        "hpc_ckpt_2": _touch(tmp_path / "hpc_ckpt_2.ckpt", times["hpc_ckpt_2"]),
    }
    assert find_resume_checkpoint(tmp_path) == paths[newest]


def test_resume_uses_last_when_it_is_the_only_checkpoint(tmp_path):
    last = _touch(tmp_path / "checkpoints" / "last.ckpt", 5.0)
    _touch(tmp_path / "checkpoints" / "step=2.ckpt", 9.0)  # periodic ones are not resume candidates
    assert find_resume_checkpoint(tmp_path) == last


def test_the_trainer_writes_checkpoints_through_the_atomic_writer(tmp_path, monkeypatch):
    """A real run (clip_pl.train.train): every checkpoint file appears by an atomic rename of a
    fsync'ed temporary file of the same directory, so a crash or a full disk mid-write never
    leaves a truncated ``last.ckpt`` (Lightning's own writer stages in $TMPDIR, with no fsync,
    and moves across file systems by copying)."""
    from clip_pl.train import train
    from tests.support.config import CPU_TINY, make_cfg

    synced, renamed = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        renamed.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cfg = make_cfg(
        [*CPU_TINY, "trainer.max_steps=3", "scheduler.warmup_steps=1", "callbacks.checkpoint.every_n_train_steps=2"],
        tmp_path,
    )
    train(cfg)
    directory = tmp_path / "runs" / "test" / "checkpoints"
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]  # and no temporary file left
    targets = {os.path.basename(dst) for src, dst in renamed if os.path.dirname(dst) == str(directory)}
    assert targets == set(files), "every checkpoint was renamed into place"
    for src, dst in renamed:
        assert os.path.dirname(src) == os.path.dirname(dst), "the temporary file sits beside its target"
        assert src in synced, "and was fsync'ed before the rename"
    assert torch.load(directory / "last.ckpt", weights_only=True)["global_step"] == 3


def test_the_wandb_run_id_is_stable_per_run_directory(tmp_path):
    a, b = tmp_path / "runs" / "1234", tmp_path / "other" / "1234"
    assert wandb_run_id(a) == wandb_run_id(a)  # a requeued job continues the same W&B run
    assert wandb_run_id(a) != wandb_run_id(b)  # another run directory never collides


def test_a_fresh_start_refuses_a_run_directory_that_has_checkpoints(tmp_path):
    from omegaconf import OmegaConf

    from clip_pl.assembly import resume_checkpoint
    from clip_pl.config_checks import ConfigError

    cfg = OmegaConf.create({"resume": "none"})
    assert resume_checkpoint(cfg, tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="resume=auto"):
        resume_checkpoint(cfg, tmp_path)
    with pytest.raises(ConfigError, match="resume='/no/such.ckpt': no such checkpoint"):
        resume_checkpoint(OmegaConf.create({"resume": "/no/such.ckpt"}), tmp_path)


# ---- folder checkpoints (DeepSpeed, sharded FSDP): written aside, swapped in -----------------


class FolderStrategy:
    """Stands in for DeepSpeed's save on one rank: a folder of parts, written part by part;
    ``fail_after`` parts into a save it raises, as a preempted or crashing writer would stop."""

    _save_distributed_checkpoint = True  # what makes clip_pl.checkpointing.writes_folders say yes

    def __init__(self) -> None:
        self.fail_after: int | None = None

    def barrier(self, name=None) -> None:
        pass


class FolderTrainer:
    is_global_zero = True

    def __init__(self, step: int) -> None:
        self.strategy, self.global_step, self.saved_to = FolderStrategy(), step, []

    def save_checkpoint(self, path, weights_only=None) -> None:
        self.saved_to.append(path)
        os.makedirs(path, exist_ok=True)
        for part in range(4):
            if self.strategy.fail_after is not None and part == self.strategy.fail_after:
                raise RuntimeError("killed mid-save")
            with open(os.path.join(path, f"part{part}"), "w") as f:
                f.write(str(self.global_step))


def _parts(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_folder_checkpoint_is_swapped_in_whole_or_not_at_all(tmp_path):
    from clip_pl.checkpointing import save_checkpoint_atomically

    last = tmp_path / "checkpoints" / "last.ckpt"
    trainer = FolderTrainer(step=10)
    save_checkpoint_atomically(trainer, last)
    assert trainer.saved_to == [str(tmp_path / "checkpoints" / ".last.ckpt.tmp-10")]  # never in place
    assert _parts(last) == {f"part{i}": "10" for i in range(4)}
    trainer.global_step, trainer.strategy.fail_after = 20, 2
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_checkpoint_atomically(trainer, last)
    assert _parts(last) == {f"part{i}": "10" for i in range(4)}  # the previous one, whole
    trainer.global_step, trainer.strategy.fail_after = 30, None
    save_checkpoint_atomically(trainer, last)  # over an existing folder and a leftover temporary one
    assert _parts(last) == {f"part{i}": "30" for i in range(4)}
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert find_resume_checkpoint(tmp_path) == str(last)


def test_replace_path_without_atomic_exchange_keeps_a_resumable_previous(tmp_path, monkeypatch):
    import clip_pl.checkpointing as ckpt

    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)  # a file system without renameat2
    (tmp_path / "checkpoints").mkdir()
    last, new = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / ".new"
    last.mkdir(), new.mkdir()
    (new / "part0").write_text("new")
    real_rename = os.rename
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed between the two renames")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", crash_on_second)
    with pytest.raises(OSError):
        ckpt.replace_path(new, last)
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / ".last.ckpt.prev")
