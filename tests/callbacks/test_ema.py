"""Weight EMA (clip_pl/callbacks/ema.py): the hand-computed recursion, bitwise resume, the eval callbacks and
export reading the EMA weights, 1 vs 2 DDP ranks (with locked towers and layer-wise LR decay too)."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch

from clip_pl.callbacks.ema import EMA
from clip_pl.callbacks.evaluation import _PeriodicEvaluation
from tests.support.config import CPU_TINY, make_cfg
from tests.support.distributed import run_distributed
from tests.support.tiny_fit import fit, make_module, snapshot

# Compares two computations of the same numbers: also run under ATEN_CPU_CAPABILITY=avx2 in CI (.ci/run).
pytestmark = pytest.mark.numerics


class Record(L.Callback):
    """The weights after every optimizer step (global_step → weights)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = snapshot(pl_module)


class SeesWeights(_PeriodicEvaluation):
    """An eval callback that records the weights it is handed."""

    def __init__(self, every_n_steps: int):
        super().__init__("sees", every_n_steps, at_train_end=False)
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def setup(self, trainer, pl_module, stage):
        pass

    def evaluate(self, model, model_config, autocast=None):
        self.seen[self._step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return {}

    def _evaluate_now(self, trainer, pl_module):
        self._step = trainer.global_step
        return super()._evaluate_now(trainer, pl_module)


def test_ema_follows_the_hand_computed_recursion_and_the_eval_callbacks_score_it():
    decay, start, steps = 0.9, 2, 6
    ema, record, sees = (
        EMA(enabled=True, decay=decay, start_step=start, evaluate_with_ema=True),
        Record(),
        SeesWeights(3),
    )
    module = make_module()
    fit(module, steps=steps, callbacks=[record, ema, sees])
    expected = {n: w.double() for n, w in record.weights[1].items()}
    for step in range(2, steps + 1):
        for name, value in record.weights[step].items():
            expected[name] = value.double() if step <= start else decay * expected[name] + (1 - decay) * value.double()
        if step == 3:
            at_three = {n: v.float() for n, v in expected.items()}
    assert ema.step == steps and set(ema.ema) == set(expected)
    for name, value in expected.items():
        assert ema.ema[name].dtype == torch.float32
        torch.testing.assert_close(ema.ema[name].double(), value, rtol=0, atol=1e-6, msg=name)
    # the eval callback at step 3 saw the EMA weights, and training went on with the trained ones
    for name, value in sees.seen[3].items():
        torch.testing.assert_close(value, at_three[name], rtol=0, atol=1e-6, msg=name)
    assert not all(torch.equal(sees.seen[3][n], record.weights[3][n]) for n in record.weights[3])
    assert all(torch.equal(p, record.weights[steps][n]) for n, p in snapshot(module).items())


def test_a_resumed_run_gives_bitwise_the_ema_of_an_uninterrupted_one(tmp_path):
    # One batch an epoch (the same batch every step): what is tested is the EMA's own state, not the
    # data order at an epoch boundary (tests/test_resume_at_epoch_end.py covers that).
    settings = dict(enabled=True, decay=0.8, start_step=1)
    whole = EMA(**settings)
    reference = make_module()
    fit(reference, steps=10, callbacks=[whole], root=str(tmp_path / "a"), samples=8)
    first = make_module()
    trainer = fit(first, steps=5, callbacks=[EMA(**settings)], root=str(tmp_path / "b"), samples=8)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert checkpoint["callbacks"]["EMA"]["step"] == 5
    resumed, second = EMA(**settings), make_module()
    torch.manual_seed(1)  # a fresh process would not share the first run's RNG either
    fit(
        second, steps=10, callbacks=[resumed], ckpt_path=str(tmp_path / "mid.ckpt"), root=str(tmp_path / "b"), samples=8
    )
    assert resumed.step == whole.step == 10
    assert all(torch.equal(resumed.ema[n], whole.ema[n]) for n in whole.ema)  # bitwise
    assert all(torch.equal(p, dict(reference.model.named_parameters())[n]) for n, p in second.model.named_parameters())


def test_export_with_ema_writes_the_ema_weights(tmp_path):
    from clip_pl.interchange import main

    ema, module = EMA(enabled=True, decay=0.5), make_module()
    trainer = fit(module, steps=3, callbacks=[ema])
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    main(["export", str(tmp_path / "run.ckpt"), str(tmp_path / "plain")])
    main(["export", str(tmp_path / "run.ckpt"), str(tmp_path / "ema"), "--ema"])
    plain = torch.load(tmp_path / "plain" / "open_clip_pytorch_model.bin", weights_only=True)
    averaged = torch.load(tmp_path / "ema" / "open_clip_pytorch_model.bin", weights_only=True)
    for name, value in ema.ema.items():
        assert torch.equal(averaged[name], value.reshape(averaged[name].shape)), name
        assert torch.equal(plain[name], module.model.get_parameter(name).detach()), name
    # a checkpoint without EMA says so
    trainer = fit(make_module(), steps=1)
    trainer.save_checkpoint(tmp_path / "none.ckpt")
    with pytest.raises(SystemExit) as stop:  # a one-line error (tests/test_interchange.py), not a traceback
        main(["export", str(tmp_path / "none.ckpt"), str(tmp_path / "x"), "--ema"])
    assert stop.value.code == 2


def _fit_ranks(rank: int, world_size: int, root: str) -> dict:
    torch.set_num_threads(1)
    ema = EMA(enabled=True, decay=0.7, start_step=1)
    module = make_module(
        lock=dict(lock_image=True, lock_image_unlocked_groups=1),
        tower_lr=dict(text_layer_decay=0.5, image_lr_scale=2.0),
    )
    fit(module, steps=4, callbacks=[ema], rank=rank, world_size=world_size, root=root)
    return {"weights": snapshot(module), "ema": {n: t.cpu() for n, t in ema.ema.items()}}


def test_one_and_two_ddp_ranks_give_the_same_weights_and_ema(tmp_path):
    initial = snapshot(make_module())
    one = _fit_ranks(0, 1, str(tmp_path / "one"))
    two = run_distributed(_fit_ranks, world_size=2, args=(str(tmp_path / "two"),), timeout=240)
    for result in two:
        for kind in ("weights", "ema"):
            for name, value in one[kind].items():
                got = result[kind][name]
                if name.endswith("attn.in_proj_bias"):
                    # The key bias's true gradient is 0 (softmax ignores a shift per query), so its gradient
                    # is float noise that Adam scales up to ±lr steps on either side: compare q and v only.
                    keep = torch.ones_like(value, dtype=torch.bool)
                    keep[value.numel() // 3 : 2 * value.numel() // 3] = False
                    got, value = got[keep], value[keep]
                # averaged gradients summed in another order: float32 rounding, no more
                torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
                if re.match(r"visual\.(?!proj$)", name):  # locked: bitwise the initial weights on every rank
                    assert torch.equal(result[kind][name], initial[name]), name
    for name in one["ema"]:
        assert torch.equal(two[0]["ema"][name], two[1]["ema"][name])  # the ranks agree exactly


@pytest.mark.parametrize(
    "override, message",
    [
        ("callbacks.ema.enabled=true callbacks.ema.decay=1.0", "callbacks.ema.decay=1.0 must be in (0, 1)"),
        ("callbacks.ema.enabled=true callbacks.ema.start_step=-3", "start_step=-3 must be an integer >= 0"),
        ("callbacks.ema.enabled=true strategy=fsdp trainer.devices=2", "shards the parameters"),
    ],
)
def test_bad_ema_options_are_refused_before_anything_is_built(override, message, tmp_path):
    from clip_pl.config_checks import ConfigError, prepare_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare_config(make_cfg([*CPU_TINY, *override.split()], tmp_path))
