"""The contract with the trainer, end to end: a real clip_pl training run (tiny model, synthetic
data, eval=demo_digits) evaluates during training; its checkpoint then loads with clip_pl.load,
evaluates standalone to the same numbers, and exports to open_clip with identical embeddings.

    pytest tests/eval/test_with_trainer.py
"""

from __future__ import annotations

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir

from clip_pl.callbacks.evaluation import ZeroShotCallback
from clip_pl.config_dir import config_dir
from clip_pl.eval.__main__ import run
from clip_pl.inference import load
from clip_pl.interchange import export_open_clip
from tests.support.eval import assert_same_weights, random_images, write_imagefolder


def test_training_checkpoint_loads_evaluates_and_exports(tmp_path):
    from clip_pl.train import train

    test_dir = write_imagefolder(
        tmp_path / "demo" / "test", random_images(12, size=70, seed=4), [i % 10 for i in range(12)]
    )
    (test_dir / "classnames.txt").write_text("\n".join(str(i) for i in range(10)) + "\n")
    (test_dir / "templates.txt").write_text("a photo of the number {}.\na handwritten {}\n")
    demo = [f"paths.demo_dir={tmp_path / 'demo'}", "eval=demo_digits", "eval.callbacks.demo_digits.num_workers=0"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "debug=smoke",
                "trainer.max_steps=3",
                "scheduler.warmup_steps=1",
                "data.batch_size=4",
                f"paths.root_dir={tmp_path}",
                "run_name=run",
                "eval.callbacks.demo_digits.every_n_steps=2",
                *demo,
            ],
        )
        trainer = train(cfg)
        eval_cfg = compose("eval_app", overrides=[f"checkpoint={tmp_path / 'runs/run/checkpoints/last.ckpt'}", *demo])
    callback = next(cb for cb in trainer.callbacks if isinstance(cb, ZeroShotCallback))
    assert [step for step, _ in callback.history] == [2, 3]

    checkpoint = tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt"
    standalone = run(eval_cfg, "demo_digits")["results"]["demo_digits"]
    assert standalone == {k: v for k, v in callback.last_metrics.items() if k != "seconds"}

    model = load(checkpoint, device="cpu").model
    trained = trainer.lightning_module.model.eval()
    assert_same_weights(model.clip.state_dict(), trained.state_dict())
    exported = export_open_clip(checkpoint, tmp_path / "export")
    reference = open_clip.create_model(f"local-dir:{exported.directory}").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reference.encode_image(images), trained.encode_image(images))
    assert model.zero_shot_classify(random_images(1)[0], ["0", "1"]).sum().item() == pytest.approx(1.0)
