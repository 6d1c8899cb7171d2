"""Every strategy clip_pl ships, trained for real on 2 CPU processes (gloo) and held to DDP.

One pair of processes trains the tiny model on real WebDataset shards under each strategy with
``clip_pl.train.train`` (the function ``python -m clip_pl.train`` calls) and a real Trainer:
10 steps from the same seed, gradient clipping on, the temperature starting just above its cap.
Then it resumes each run from its step-6 checkpoint (sharded folders included). The checks:

* the loss and gradient-norm curves equal DDP's (1e-4 relative): they are all data parallel;
* the parameters in the weight-decay group are DDP's, read from each strategy's own optimizer;
* the temperature starts at the cap (100) and comes back down (the cap is not a latch);
* the 4 losses after a resume equal the uninterrupted run's;
* the final model gives DDP's embeddings, and a consolidated ZeRO-3 / FSDP folder loads with
  ``clip_pl.load`` and gives the live model's embeddings;
* model.grad_cache_chunks under FSDP and ZeRO-3 gives DDP's curve without chunks;
* under bf16-mixed (DDP, FSDP, DeepSpeed) the loss sees fp32 features, temperature and bias
  with autocast off, and the temperature parameter itself stays fp32.

The launcher path (``python -m clip_pl.train strategy=… trainer.devices=2``) runs at the end.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.support.distributed import run_distributed

# Compares two computations of the same numbers (marker numerics). The first test's setup trains the
# whole matrix (~2 min alone, ~4 min beside the rest of the suite on 2 cores): pytest-timeout's 600 s
# default counts the setup, and a busy machine must not turn it into an error.
pytestmark = [pytest.mark.numerics, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = [
    "ddp",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_3",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3_offload",
    "fsdp",
]
STEPS, RESUME_AT = 10, 6
# Just above the cap: a latched cap (zero gradient above it) would hold the temperature at 100.
INIT_LOGIT_SCALE = math.log(100.0) + 2e-3


def common_overrides(shards: str) -> list[str]:
    # No loader workers: crops are seeded per batch in the training process too (a resume re-crops
    # alike), and nothing is forked from processes that DeepSpeed's and gloo's threads run in.
    return [
        "model=tiny",
        "trainer=cpu",
        "trainer.devices=2",
        "data=wds",
        f"data.train_shards={shards}",
        "data.batch_size=8",
        "data.num_workers=0",
        "global_batch_size=null",
        f"trainer.max_steps={STEPS}",
        "scheduler.warmup_steps=1",
        "trainer.log_every_n_steps=1",
        "trainer.gradient_clip_val=1.0",
        f"model.init_logit_scale={INIT_LOGIT_SCALE}",
        f"callbacks.checkpoint.every_n_train_steps={RESUME_AT}",
        "callbacks.checkpoint.save_last=false",
        f"callbacks.telemetry.heatmap_every_n_steps={STEPS}",
        "callbacks.progress_bar=null",
        "logger=csv",
        "eval=none",
    ]


def compose(overrides: list[str], root: Path, run_name: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from clip_pl.config_dir import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("train", overrides=[f"paths.root_dir={root}", f"run_name={run_name}", *overrides])


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    columns: dict[str, dict[int, float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value and key != "step" and row.get("step"):
                    columns.setdefault(key, {})[int(float(row["step"]))] = float(value)
    return columns


def curve(metrics: dict[str, dict[int, float]], key: str) -> list[float]:
    return [metrics[key][step] for step in sorted(metrics[key])]


def decayed_parameter_names(trainer) -> set[str]:
    """Names of the parameters the live optimizer applies weight decay to, from its own groups."""
    module = trainer.lightning_module
    names = {id(p): n for n, p in module.model.named_parameters()}
    optimizer = trainer.optimizers[0]
    if hasattr(optimizer, "bit16_groups"):  # DeepSpeed ZeRO 1/2: the module's parameters per group
        groups = optimizer.bit16_groups
    elif hasattr(optimizer, "fp16_groups"):  # ZeRO 3
        groups = optimizer.fp16_groups
    else:
        groups = [g["params"] for g in optimizer.param_groups]
    decays = [
        g["weight_decay"] for g in (optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).param_groups
    ]
    assert len(groups) == len(decays) == 2
    return {names[id(p)] for group, wd in zip(groups, decays) if wd > 0 for p in group}


def probe_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    texts = torch.randint(1, 49000, (4, 32), generator=generator)
    texts[:, 0], texts[:, 10], texts[:, 11:] = 49406, 49407, 0
    return images, texts


@torch.no_grad()
def live_embeddings(module) -> tuple[torch.Tensor, torch.Tensor]:
    """Through the module's forward, which gathers FSDP / ZeRO-3 shards (every rank calls it)."""
    module.eval()
    images, texts = probe_batch()
    image_features, text_features = module.encode(images, texts)[:2]
    return image_features.float().clone(), text_features.float().clone()


class RecordLossInputs(L.Callback):
    """Put on the run through its config: records, at the loss's entry, the dtypes of its inputs and
    whether autocast is on inside it."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.loss.register_forward_pre_hook(self._record)

    def _record(self, loss_module, args) -> None:
        image_features, text_features, scale, bias = args
        self.seen.append(
            {
                "features": {image_features.dtype, text_features.dtype},
                "scale": scale.dtype,
                "bias": None if bias is None else bias.dtype,
                "autocast": torch.is_autocast_enabled("cpu"),
            }
        )


def _strategy_matrix(rank: int, world_size: int, shards: str, root: str) -> dict:
    from clip_pl.train import train

    root_path, results = Path(root), {}
    for strategy in STRATEGIES:
        overrides = [*common_overrides(shards), f"strategy={strategy}"]
        if strategy == "fsdp":
            overrides.append("strategy.state_dict_type=sharded")  # a folder of shards, like DeepSpeed's
        started = time.perf_counter()
        trainer = train(compose(overrides, root_path, strategy))
        print(f"[timing] {strategy}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        result = {"decayed": decayed_parameter_names(trainer), "embeddings": live_embeddings(trainer.lightning_module)}
        resumed = compose(
            [*overrides, f"resume='{root_path}/runs/{strategy}/checkpoints/step={RESUME_AT}.ckpt'"],
            root_path,
            f"{strategy}-resumed",
        )
        train(resumed)
        results[strategy] = result
    for strategy, chunks in (("ddp", 1), ("fsdp", 2), ("deepspeed_stage_3", 2)):  # DDP unchunked: the reference
        train(
            compose(
                [
                    *common_overrides(shards),
                    f"strategy={strategy}",
                    f"model.grad_cache_chunks={chunks}",
                    "trainer.max_steps=5",
                ],
                root_path,
                f"{strategy}-grad-cache",
            )
        )
    for strategy in ("ddp", "fsdp", "deepspeed_stage_3"):
        trainer = train(
            compose(
                [
                    *common_overrides(shards),
                    f"strategy={strategy}",
                    "trainer.precision=bf16-mixed",
                    "trainer.max_steps=3",
                    "loss=siglip",
                    "model.init_logit_bias=-10",
                    "+callbacks.record._target_=tests.test_strategies.RecordLossInputs",
                ],
                root_path,
                f"{strategy}-bf16",
            )
        )
        recorder = next(c for c in trainer.callbacks if isinstance(c, RecordLossInputs))
        results[f"{strategy}-bf16"] = {
            "loss_inputs": recorder.seen,
            "temperature_dtype": trainer.lightning_module.model.logit_scale.dtype,
        }
    return results if rank == 0 else {}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    from tests.support.fake_shards import write_shards

    shards = tmp_path_factory.mktemp("shards")
    write_shards(str(shards), sizes=[36, 36, 36, 36], image_px=(64, 80))  # 144 samples: 9 global batches of 16
    root = tmp_path_factory.mktemp("runs")
    results = run_distributed(_strategy_matrix, world_size=2, args=(str(shards), str(root)), timeout=1500)[0]
    return {"results": results, "root": root, "shards": shards}


def metrics_of(matrix, run_name: str) -> dict[str, dict[int, float]]:
    return read_metrics(matrix["root"] / "runs" / run_name)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_like_ddp(matrix, strategy):
    reference, metrics = metrics_of(matrix, "ddp"), metrics_of(matrix, strategy)
    assert sorted(metrics["train/loss"]) == list(range(1, STEPS + 1))
    assert curve(metrics, "train/loss") == pytest.approx(curve(reference, "train/loss"), rel=1e-4)
    # Clipping is active (the first norms are above 1.0) and the reported norm is the global one.
    assert curve(reference, "train/grad_norm")[0] > 1.0
    assert curve(metrics, "train/grad_norm") == pytest.approx(curve(reference, "train/grad_norm"), rel=1e-4)
    ours, ddp = matrix["results"][strategy], matrix["results"]["ddp"]
    assert ours["decayed"] == ddp["decayed"]
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in ours["decayed"]
    assert not {"logit_scale", "visual.class_embedding", "ln_final.weight"} & ours["decayed"]
    for live, reference_features in zip(ours["embeddings"], ddp["embeddings"]):
        torch.testing.assert_close(live, reference_features, rtol=1e-4, atol=1e-5)
    # The similarity heatmap encodes through forward(), where FSDP / ZeRO-3 gather their shards.
    assert (matrix["root"] / "runs" / strategy / "plots" / f"similarity_step{STEPS:07d}.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_temperature_comes_back_down_from_the_cap(matrix, strategy):
    temperature = curve(metrics_of(matrix, strategy), "train/temperature")
    assert temperature[0] == pytest.approx(100.0)  # the parameter starts above the cap: capped
    assert temperature[-1] < 99.95  # and the gradient brought it back below (a latched cap logs 100.0 exactly)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_resumed_run_continues_the_uninterrupted_one(matrix, strategy):
    full, resumed = metrics_of(matrix, strategy), metrics_of(matrix, f"{strategy}-resumed")
    assert sorted(resumed["train/loss"]) == list(range(RESUME_AT + 1, STEPS + 1))
    expected = [full["train/loss"][s] for s in range(RESUME_AT + 1, STEPS + 1)]
    assert curve(resumed, "train/loss") == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "fsdp"])
def test_a_consolidated_sharded_checkpoint_loads_with_the_live_embeddings(matrix, strategy, tmp_path):
    import clip_pl

    folder = matrix["root"] / "runs" / strategy / "checkpoints" / f"step={STEPS}.ckpt"
    assert folder.is_dir()  # sharded: one folder, a shard per rank
    out = tmp_path / "consolidated.ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "clip_pl.interchange", "consolidate", str(folder), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model, _, _ = clip_pl.load(out)
    images, texts = probe_batch()
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(texts)
    live_images, live_texts = matrix["results"][strategy]["embeddings"]
    torch.testing.assert_close(image_features, live_images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_features, live_texts, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_3"])
def test_grad_cache_chunks_under_sharded_parameters_follow_ddp(matrix, strategy):
    chunked = curve(metrics_of(matrix, f"{strategy}-grad-cache"), "train/loss")
    assert len(chunked) == 5
    assert chunked == pytest.approx(curve(metrics_of(matrix, "ddp-grad-cache"), "train/loss"), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_stage_3"])
def test_under_bf16_the_loss_runs_in_fp32_and_the_temperature_stays_fp32(matrix, strategy):
    """With the sigmoid loss, whose bias is returned by the model's forward (freed by FSDP2 and
    ZeRO-3 after it unless copied) and whose text blocks travel round the ranks."""
    result = matrix["results"][f"{strategy}-bf16"]
    assert len(result["loss_inputs"]) == 3
    for seen in result["loss_inputs"]:
        assert seen == {"features": {torch.float32}, "scale": torch.float32, "bias": torch.float32, "autocast": False}
    assert result["temperature_dtype"] == torch.float32
    losses = curve(metrics_of(matrix, f"{strategy}-bf16"), "train/loss")
    assert losses == pytest.approx(curve(metrics_of(matrix, "ddp-bf16"), "train/loss"), rel=2e-2)  # bf16 noise


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_stage_3_offload"])
def test_the_entry_point_launches_sharded_strategies_on_two_processes(matrix, strategy, tmp_path):
    """python -m clip_pl.train with Lightning's own launcher: the same curve as the in-process runs. The
    strategy whose start once died only at launch (ZeRO-3 with offload); the launcher itself is the same for
    every strategy (DDP's runs through it in benchmarks.strategy_memory, tests/test_benchmarks.py), and FSDP
    trains, resumes and consolidates in the matrix above."""
    command = [
        sys.executable,
        "-m",
        "clip_pl.train",
        *common_overrides(str(matrix["shards"])),
        f"strategy={strategy}",
        "trainer.max_steps=5",
        f"paths.root_dir={tmp_path}",
        "run_name=cli",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = curve(read_metrics(tmp_path / "runs" / "cli"), "train/loss")
    assert losses == pytest.approx(curve(metrics_of(matrix, "ddp-grad-cache"), "train/loss"), rel=1e-4)  # DDP, 5 steps
