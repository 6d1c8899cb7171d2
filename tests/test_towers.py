"""Tower control (clip_pl/towers.py): locked towers stay bitwise still and own no optimizer state,
locked BatchNorm keeps its statistics, every optimizer group's lr is base × decay^(last − depth) ×
tower scale through the whole schedule, and bad options are refused before anything is built."""

from __future__ import annotations

import math
import re

import pytest
import torch

from clip_pl.schedule import warmup_cosine
from tests.support.config import CPU_TINY, make_cfg
from tests.support.tiny_fit import BASE_LR, TINY2, fit, make_module, snapshot


def is_text(name: str) -> bool:
    return not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")


def test_locked_towers_stay_bitwise_still_and_own_no_optimizer_state():
    # Image tower all locked; text tower locked but for its last 2 groups (open_clip's groups: the
    # embeddings, each block but the last, the last block + final norm, the projection).
    # (with layer-wise decay on the text tower, so its per-depth groups are built too)
    module = make_module(
        lock=dict(lock_image=True, lock_text=True, lock_text_unlocked_layers=2), tower_lr=dict(text_layer_decay=0.8)
    )
    before = snapshot(module)
    trainer = fit(module, steps=50)
    after = snapshot(module)
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    with_state = {id(p) for p in optimizer.state}
    trainable_text = re.compile(r"(transformer\.resblocks\.1\.|ln_final\.|text_projection)")
    for name, param in module.model.named_parameters():
        locked = name.startswith("visual.") or (is_text(name) and not trainable_text.match(name))
        assert param.requires_grad is not locked, name
        if locked:
            assert torch.equal(before[name], after[name]), name  # bitwise unchanged after 50 steps
            assert id(param) not in in_optimizer and id(param) not in with_state and param.grad is None, name
        else:
            assert id(param) in with_state, name
            assert not torch.equal(before[name], after[name]), name  # the rest trains
    assert module.model.logit_scale.requires_grad


def test_unlocked_groups_follow_open_clip_meanings():
    def names(m):
        return {n for n, p in m.model.named_parameters() if p.requires_grad and n.startswith("visual.")}

    locked = make_module(lock=dict(lock_image=True))  # the plain two groups leave locked parameters out too
    assert all(p.requires_grad for g in locked.parameter_groups() for p in g["params"])
    assert names(make_module(lock=dict(lock_image=True, lock_image_unlocked_groups=1))) == {"visual.proj"}
    last_two = names(make_module(lock=dict(lock_image=True, lock_image_unlocked_groups=2)))
    assert last_two == {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"} | {
        n for n in snapshot(make_module()) if n.startswith("visual.transformer.resblocks.1.")
    }


def test_locked_batchnorm_keeps_its_statistics_through_train_mode():
    resnet = dict(
        embed_dim=8,
        vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8, head_width=8),
        text_cfg=TINY2["text_cfg"],
    )
    module = make_module(lock=dict(lock_image=True), arch_config=resnet)
    stats = {n: b.clone() for n, b in module.model.visual.named_buffers()}
    module.train()  # what Lightning does at every epoch start
    module.contrastive_loss({"image": torch.randn(4, 3, 32, 32), "text": torch.randint(1, 1000, (4, 8))}).backward()
    assert stats and all(torch.equal(b, stats[n]) for n, b in module.model.visual.named_buffers())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.model.visual.modules())
    assert all(p.grad is None for p in module.model.visual.parameters())


def expected_scale(name: str, tower_lr: dict) -> float:
    """Depth by hand from open_clip's names: 0 embeddings, block i → i + 1, 3 = final norm + projection."""
    if name in ("logit_scale", "logit_bias"):
        return 1.0
    tower = "image" if name.startswith("visual.") else "text"
    block = re.search(r"transformer\.resblocks\.(\d+)\.", name)
    if block:
        depth = int(block.group(1)) + 1
    elif re.search(r"(conv1|class_embedding|positional_embedding|ln_pre|token_embedding)", name):
        depth = 0
    else:
        depth = 3
    return tower_lr[f"{tower}_lr_scale"] * tower_lr[f"{tower}_layer_decay"] ** (3 - depth)


def test_every_group_lr_is_base_times_decay_power_depth_times_tower_scale_through_the_schedule():
    tower_lr = dict(image_lr_scale=0.5, text_lr_scale=2.0, image_layer_decay=0.75, text_layer_decay=0.6)
    module = make_module(tower_lr=tower_lr)
    optimizer = module.optimizer_factory(module.parameter_groups())
    from clip_pl.towers import apply_lr_scales, base_lr

    apply_lr_scales(optimizer)
    scheduler = warmup_cosine(optimizer, total_steps=20, warmup_steps=5)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    exempt = {n for n, p in module.model.named_parameters() if n in module.no_decay_names}
    assert len(group_of) == sum(1 for _ in module.model.parameters())  # every parameter, once
    for step in range(20):
        multiplier = scheduler.lr_lambdas[0](step)
        for name, param in module.model.named_parameters():
            group = group_of[id(param)]
            assert group["lr"] == pytest.approx(BASE_LR * expected_scale(name, tower_lr) * multiplier, rel=1e-12), name
            assert group["weight_decay"] == (0.0 if name in exempt else 0.2), name
        assert base_lr(optimizer) == pytest.approx(BASE_LR * multiplier, rel=1e-12)  # what train/lr logs
        optimizer.step()
        scheduler.step()
    # the defaults keep today's two groups at the base lr
    plain = make_module()
    assert [g.get("lr_scale", 1.0) for g in plain.parameter_groups()] == [1.0, 1.0]


def test_locked_tower_step_holds_less_memory():
    """Gradient + optimizer-state bytes after a step (what a locked tower saves), measured."""

    def step_bytes(lock):
        module = make_module(lock=lock)
        trainer = fit(module, steps=2)
        grads = sum(p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)
        state = sum(
            t.numel() * t.element_size()
            for s in trainer.optimizers[0].state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.ndim > 0
        )
        return grads + state

    full, locked = step_bytes(None), step_bytes(dict(lock_image=True))
    image = sum(p.numel() * 4 for p in make_module().model.visual.parameters())
    assert full - locked == 3 * image  # its gradient and Adam's two moments, no longer held


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.lock_text=true model.lock_text_unlocked_layers=-1",
            "lock_text_unlocked_layers=-1 must be an integer >= 0",
        ),
        ("optim.image_layer_decay=1.5", "image_layer_decay=1.5 must be in (0, 1]"),
        ("optim.text_layer_decay=0", "text_layer_decay=0.0 must be in (0, 1]"),
        ("model=rn50 optim.image_layer_decay=0.8", "needs a ViT image tower"),
        ("model=rn50 model.lock_image=true model.lock_image_unlocked_groups=1", "needs a ViT image tower"),
        ("model.lock_image=true strategy=fsdp trainer.devices=2", "tested only under DDP"),
        ("optim.text_lr_scale=0.1 strategy=deepspeed_stage_2 trainer.devices=2", "tested only under DDP"),
    ],
)
def test_bad_tower_options_are_refused_before_anything_is_built(override, message, tmp_path):
    from clip_pl.config_checks import ConfigError, prepare_config

    cfg = make_cfg([*CPU_TINY, *override.split()], tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare_config(cfg)


def test_tower_options_reach_the_module_from_the_config(tmp_path):
    from clip_pl.assembly import build_module
    from clip_pl.config_checks import prepare_config

    cfg = prepare_config(make_cfg([*CPU_TINY, "model.lock_image=true", "optim.text_layer_decay=0.5"], tmp_path))
    module = build_module(cfg)
    assert not any(p.requires_grad for p in module.model.visual.parameters())
    assert module.tower_lr["text_layer_decay"] == 0.5
    scales = {g["lr_scale"] for g in module.parameter_groups()}
    assert scales == {1.0, 0.5, 0.25, 0.125, 0.0625}  # tiny text tower: 3 blocks → depths 0..4
    assert math.isclose(min(scales), 0.5**4)
