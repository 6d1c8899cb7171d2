"""Every config composes and instantiates; every experiment runs a fast_dev_run with the tiny
model on CPU; bad configs are refused before anything is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from clip_pl.assembly import build_module
from clip_pl.config_checks import ConfigError, prepare_config
from clip_pl.train import train
from tests.support.config import CONF, CPU_TINY, choices, make_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "group", ["model", "loss", "optim", "scheduler", "trainer", "strategy", "logger", "callbacks", "debug", "paths"]
)
def test_every_choice_of_every_group_composes(group, tmp_path):
    for choice in choices(group):
        base = [o for o in CPU_TINY if not o.startswith("debug=")] if group == "debug" else CPU_TINY
        cfg = make_cfg([*base, f"{group}={choice}"], tmp_path)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("model", choices("model"))
def test_every_model_builds_from_open_clip_architectures(model, tmp_path):
    cfg = make_cfg([*CPU_TINY, f"model={model}"], tmp_path)
    module = build_module(cfg)
    assert module.model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    size = module.model.visual.image_size
    assert (size if isinstance(size, int) else size[0]) == cfg.model.image_size


def _hand_losses(image, text, scale, bias):
    """Textbook formulas on one process: symmetric InfoNCE, and SigLIP's pairwise sigmoid."""
    import torch.nn.functional as F

    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    signs = 2 * torch.eye(len(image)) - 1
    siglip = -F.logsigmoid(signs * (logits + bias)).sum() / len(image)
    return {"clip": clip, "siglip": siglip}


def test_every_instantiable_choice_builds_what_it_names(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    from clip_pl.strategies import FSDP2Strategy

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    expected = _hand_losses(image, text, torch.tensor(14.0), torch.tensor(-3.0))
    for choice in choices("loss"):
        loss = instantiate(make_cfg([*CPU_TINY, f"loss={choice}"], tmp_path).loss)
        value = loss(image, text, torch.tensor(14.0), torch.tensor(-3.0) if choice == "siglip" else None)
        assert value.item() == pytest.approx(expected[choice].item(), rel=1e-5), choice

    cfg = make_cfg([*CPU_TINY, "data.batch_size=3"], tmp_path)
    data = instantiate(cfg.data)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (3, 3, 64, 64) and batch["text"].shape == (3, 32)  # model=tiny's sizes

    ddp = instantiate(make_cfg([*CPU_TINY, "strategy=ddp"], tmp_path).strategy)
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs == {
        "find_unused_parameters": False,
        "gradient_as_bucket_view": True,
        "static_graph": False,
    }
    fsdp = instantiate(make_cfg([*CPU_TINY, "strategy=fsdp"], tmp_path).strategy)
    assert isinstance(fsdp, FSDP2Strategy) and fsdp.reshard_after_forward and fsdp.reduce_dtype == torch.float32
    for choice in choices("strategy"):  # each also runs for real in tests/test_strategies.py
        strategy = instantiate(make_cfg([*CPU_TINY, f"strategy={choice}"], tmp_path).strategy)
        if choice.startswith("deepspeed"):
            zero = strategy.config["zero_optimization"]
            assert zero["stage"] == int(choice.split("_")[2])
            assert ("offload_optimizer" in zero) == ("offload" in choice)

    for choice in choices("scheduler"):
        cfg = make_cfg([*CPU_TINY, f"scheduler={choice}", "scheduler.warmup_steps=4"], tmp_path)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=100_000)
        lrs = []
        for _ in range(5):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0], rel=1e-3), choice  # linear warmup to the base lr


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory) -> Path:
    from tests.support.fake_shards import write_shards

    directory = tmp_path_factory.mktemp("shards")
    write_shards(str(directory), [3, 3], image_px=(40, 56))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("experiment", choices("experiment"))
def test_every_experiment_builds_its_own_model_and_data_and_takes_a_step(experiment, tmp_path, few_shards):
    """The recipe as written (its model, loss, optimiser, schedule, data module), changed only where
    this machine must: CPU in fp32, 2 pairs per batch from 6 local samples, one step."""
    overrides = [
        f"experiment={experiment}",
        f"data.train_shards={few_shards}",
        "data.batch_size=2",
        "global_batch_size=null",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "trainer.devices=1",
        "trainer.fast_dev_run=true",
        "eval=none",
        "resume=auto",
    ]
    cfg = make_cfg(overrides, tmp_path)
    trainer = train(cfg)
    assert trainer.global_step == 1
    module, datamodule = trainer.lightning_module, trainer.datamodule
    assert module.hparams.arch == cfg.model.arch
    size = module.model.visual.image_size
    assert (size if isinstance(size, int) else size[0]) == cfg.model.image_size
    assert type(module.loss).__name__ == cfg.loss._target_.rsplit(".", 1)[1]
    if cfg.model.init_logit_bias is not None:
        assert module.model.logit_bias.item() == pytest.approx(cfg.model.init_logit_bias, abs=1e-2)
    decay = trainer.optimizers[0].param_groups[0]
    assert decay["initial_lr"] == cfg.optim.lr and decay["weight_decay"] == cfg.optim.weight_decay
    assert tuple(decay["betas"]) == tuple(cfg.optim.betas) and decay["eps"] == cfg.optim.eps
    assert type(datamodule).__name__ == "WebDatasetDataModule" and datamodule.num_samples == cfg.data.num_samples


def test_every_recipe_sets_the_per_device_batch_from_its_global_batch(tmp_path):
    for experiment in choices("experiment"):
        cfg = make_cfg(
            [f"experiment={experiment}", "data.train_shards=/nowhere", "trainer.devices=8", "trainer.num_nodes=4"],
            tmp_path,
        )
        global_batch = cfg.global_batch_size
        prepare_config(cfg, check_paths=False)  # the batch arithmetic; /nowhere is not there
        if global_batch is not None:
            assert cfg.data.batch_size * 32 == global_batch, experiment


def test_a_real_run_logs_checkpoints_and_events(tmp_path):
    cfg = make_cfg(
        [
            *CPU_TINY,
            "trainer.max_steps=5",
            "scheduler.warmup_steps=2",
            "trainer.log_every_n_steps=2",
            "callbacks.checkpoint.every_n_train_steps=2",
        ],
        tmp_path,
    )
    train(cfg)
    run_dir = tmp_path / "runs" / "test"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=2.ckpt", "step=4.ckpt", "step=5.ckpt"]  # periodic, and the final step
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "end"]
    assert events[0]["global_batch_size"] == 4 and events[1]["global_step"] == 5
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    for column in ["train/loss", "train/lr", "train/temperature", "train/grad_norm", "perf/samples_per_s"]:
        assert column in metrics.splitlines()[0]


BAD = {
    "global_batch_size=30 trainer.devices=4": "not divisible by the 4 devices",
    "strategy=deepspeed_stage_2_offload optim=adamw": "optim=deepspeed_cpu_adamw",
    "strategy=deepspeed_stage_3_offload optim=adamw": "optim=deepspeed_cpu_adamw",
    "strategy=fsdp trainer.precision=16-mixed": "bf16-mixed",
    "strategy=deepspeed_stage_1 trainer.precision=16-mixed": "bf16-mixed",
    "strategy=fsdp model.compile=true": "only run with strategy=ddp",
    "trainer.precision=bf16-true": "trainer.precision",
    "loss=siglip": "init_logit_bias",
    "model.grad_cache_chunks=3": "divide data.batch_size",
    "trainer.accumulate_grad_batches=4": "grad_cache_chunks",
    "scheduler=const_cooldown scheduler.warmup_steps=40 scheduler.cooldown_steps=20 trainer.max_steps=50": "exceed trainer.max_steps=50",
    "+data.not_a_key=1": "Unknown key",
    "+model.not_a_key=1": r"Unknown key\(s\) \['not_a_key'\] for model \(clip_pl.module.CLIPModule.from_options\)",
    "model.arch=ViT-Q-99": "not an open_clip architecture",
    "trainer.precision=fp8": "trainer.precision",
    "+callbacks.mystery.every_n_steps=5": "callbacks.mystery has no _target_",
    "~model._target_": "model has no _target_",
}


@pytest.mark.parametrize("override,message", BAD.items())
def test_bad_configs_are_refused_before_anything_is_built(override, message, tmp_path):
    cfg = make_cfg([*CPU_TINY, *override.split()], tmp_path)
    with pytest.raises(ConfigError, match=message):
        prepare_config(cfg)


def test_a_misspelt_model_key_stops_train_before_anything_is_built(tmp_path):
    """conf/model's keys are CLIPModule.from_options' keywords: its signature is the schema."""
    cfg = make_cfg([*CPU_TINY, "+model.grad_cache_chunk=2"], tmp_path)  # grad_cache_chunks, misspelt
    with pytest.raises(ConfigError) as refused:
        train(cfg)
    message = str(refused.value)
    assert "Unknown key(s) ['grad_cache_chunk'] for model (clip_pl.module.CLIPModule.from_options)" in message
    assert "'grad_cache_chunks'" in message  # the valid keys are listed
    assert not (tmp_path / "runs").exists()  # no run directory, no model, no data


# Groups whose choice is one object built from its _target_; groups of named entries, each built from its
# own _target_ (eval: under eval.callbacks); groups that are settings or overlays, never built.
BUILT_GROUPS = {"model", "data", "loss", "optim", "scheduler", "trainer", "strategy"}
COLLECTION_GROUPS = {"logger", "callbacks", "eval"}
SETTINGS_GROUPS = {"paths", "debug", "experiment", "hydra"}


def test_every_config_group_names_what_builds_it(tmp_path):
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert groups == BUILT_GROUPS | COLLECTION_GROUPS | SETTINGS_GROUPS, "classify the new group above"
    for group in sorted(BUILT_GROUPS | COLLECTION_GROUPS):
        for choice in choices(group):
            node = make_cfg([*CPU_TINY, f"{group}={choice}"], tmp_path)[group]
            if group in BUILT_GROUPS:
                assert "_target_" in node, f"{group}={choice} has no _target_"
                continue
            entries = node.get("callbacks") if group == "eval" else node
            # eval=suite's one setting, `eval.task_list`, is what its callback (and `python -m clip_pl.eval`) reads
            allowed = {"callbacks", "task_list"} if group == "eval" else set(node)
            assert set(node) <= allowed, f"{group}={choice}: {set(node)}"
            for name, entry in entries.items():
                assert "_target_" in entry, f"{group}={choice}: {name} has no _target_"


def test_devices_must_match_slurm_tasks_per_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    cfg = make_cfg([*CPU_TINY, "trainer.devices=4"], tmp_path)
    with pytest.raises(ConfigError, match="trainer.devices=8"):
        prepare_config(cfg)


def test_global_batch_size_sets_the_per_device_batch(tmp_path):
    for data in ("synthetic", "wds", "demo"):  # each data config's default follows the global batch
        shards = [] if data == "synthetic" else ["data.train_shards=/nowhere"]
        cfg = make_cfg(
            [
                "debug=smoke",
                f"data={data}",
                *shards,
                "global_batch_size=64",
                "trainer.devices=2",
                "trainer.num_nodes=2",
            ],
            tmp_path,
        )
        assert cfg.data.batch_size == 16, data  # already in the composed config (--cfg job --resolve)
        assert prepare_config(cfg, check_paths=False).data.batch_size == 16, data  # /nowhere is not there
    cfg = make_cfg(["debug=smoke", "global_batch_size=64", "trainer.devices=2", "data.batch_size=32"], tmp_path)
    assert prepare_config(cfg).data.batch_size == 32  # an explicit value that agrees is fine


@pytest.mark.parametrize("where", ["command line", "experiment file"])
def test_an_explicit_per_device_batch_that_contradicts_the_global_batch_is_refused(where, tmp_path):
    """Every GPU recipe sets global_batch_size; data.batch_size=… must not be overwritten without a word."""
    if where == "command line":
        overrides = ["experiment=cc3m_rn50", "data.train_shards=/nowhere", "trainer.devices=8", "data.batch_size=64"]
    else:  # an experiment of one's own that sets both
        own = tmp_path / "conf" / "experiment"
        own.mkdir(parents=True)
        (own / "mine.yaml").write_text(
            "# @package _global_\ndefaults:\n  - override /data: synthetic\n"
            "global_batch_size: 1024\ndata:\n  batch_size: 64\n"
        )
        overrides = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=mine", "trainer.devices=8"]
    cfg = make_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError) as refused:
        prepare_config(cfg, check_paths=False)
    message = str(refused.value)
    assert "data.batch_size=64 conflicts with global_batch_size=1024" in message
    assert "128 per device over 8 devices" in message and "global_batch_size=null" in message
    assert "global_batch_size=512" in message  # the other way to agree


def test_a_run_that_is_all_warmup_starts_with_a_warning(tmp_path, caplog):
    cfg = make_cfg([*CPU_TINY, "scheduler.warmup_steps=100", "trainer.max_steps=50"], tmp_path)
    prepare_config(cfg)
    assert "the whole run is warmup" in caplog.text


def test_model_options_reach_the_towers(tmp_path):
    cfg = make_cfg([*CPU_TINY, "model.patch_dropout=0.5", "model.grad_checkpointing=true"], tmp_path)
    model = build_module(cfg).model
    assert model.visual.patch_dropout.prob == 0.5
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing


def test_the_siglip_recipe_starts_at_the_papers_temperature_and_bias(tmp_path):
    """SigLIP (Zhai et al. 2023): temperature 10 and bias -10 at init, not CLIP's 1/0.07."""
    cfg = make_cfg(["experiment=siglip_vit_b16", *CPU_TINY], tmp_path)
    prepare_config(cfg)
    module = build_module(cfg)
    assert module.temperature() == pytest.approx(10.0)
    assert module.model.logit_bias.item() == pytest.approx(-10.0)


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_an_impossible_device_count_or_global_batch_is_named_as_typed(experiment, tmp_path):
    """trainer.devices=0 used to divide by zero in the checks, and trainer.devices=-1 or a negative global batch
    came out as a negative data.batch_size: the refusal names the key and the value the user gave."""
    base = [f"experiment={experiment}", "data.train_shards=/nowhere"]
    recipe = make_cfg(base, tmp_path)
    recipe_batch = recipe.global_batch_size
    impossible = ["trainer.devices=0", "trainer.num_nodes=0", "global_batch_size=-64"]
    if recipe_batch is not None or recipe.trainer.accelerator == "cpu":
        impossible.append("trainer.devices=-1")  # Lightning's "every GPU": no number to divide by, no GPU on a CPU
    else:
        prepare_config(make_cfg([*base, "trainer.devices=-1"], tmp_path), check_paths=False)
    for typed in impossible:
        cfg = make_cfg([*base, typed], tmp_path)
        with pytest.raises(ConfigError) as refused:
            prepare_config(cfg, check_paths=False)
        message = str(refused.value)
        assert message.startswith(typed), (experiment, message)
        assert "data.batch_size=-" not in message
    if recipe_batch is not None:  # the recipe's ${per_device_batch:…}, read before the checks (--cfg job --resolve)
        with pytest.raises(Exception, match="trainer.devices=0 must be a positive number"):
            OmegaConf.to_container(make_cfg([*base, "trainer.devices=0"], tmp_path).data, resolve=True)


@pytest.fixture
def wds(few_shards) -> list[str]:
    return [*CPU_TINY, "data=wds", "data.num_workers=0", f"data.sizes_file={few_shards / 'sizes.json'}"]


def test_local_shards_that_are_there_and_remote_ones_pass_the_checks(wds, few_shards, tmp_path):
    for spec in [
        few_shards,  # a folder with sizes.json
        f"'{few_shards}/{{00000..00001}}.tar'",
        f"'{few_shards}/*.tar'",
        "'pipe:cat /nowhere/{00000..00003}.tar'",  # remote: only reading them tells
        "'s3://bucket/laion/{00000..00003}.tar'",
        f"'{few_shards}::pipe:cat /nowhere/00000.tar'",
    ]:
        prepare_config(make_cfg([*wds, f"data.train_shards={spec}"], tmp_path))


@pytest.mark.parametrize(
    "spec, missing",
    [
        ("{tmp}/nope", "{tmp}/nope"),
        ("'{tmp}/nope/{{00000..00009}}.tar'", "{tmp}/nope"),
        ("'{shards}/{{000000..000009}}.tar'", "{shards}/000000.tar"),  # the brace range of another width
        ("'{tmp}/nope/*.tar'", "{tmp}/nope"),
        ("'{shards}::{tmp}/nope'", "{tmp}/nope"),
    ],
)
def test_shards_that_are_not_there_are_refused_with_the_config(spec, missing, wds, few_shards, tmp_path):
    spec, missing = (s.format(tmp=tmp_path, shards=few_shards) for s in (spec, missing))
    cfg = make_cfg([*wds, f"data.train_shards={spec}"], tmp_path)
    with pytest.raises(ConfigError) as refused:
        prepare_config(cfg)
    message = str(refused.value)
    assert message.startswith(f"data.train_shards='{spec.strip(chr(39))}'") and f"names {missing}," in message
    assert "python -m data_prep.download" in message
    prepare_config(make_cfg([*wds, f"data.train_shards={spec}"], tmp_path), check_paths=False)  # the config alone
    with pytest.raises(ConfigError, match="does not exist"):  # train() refuses before the model or a run directory
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_unset_or_missing_shards_of_the_other_data_configs_are_refused(wds, few_shards, tmp_path):
    with pytest.raises(ConfigError, match="data.train_shards is not set"):
        prepare_config(make_cfg(["debug=smoke", "data=wds"], tmp_path))
    with pytest.raises(ConfigError, match=f"data.val_shards='{tmp_path}/nope'"):
        prepare_config(
            make_cfg([*wds, f"data.train_shards={few_shards}", f"data.val_shards={tmp_path}/nope"], tmp_path)
        )
    with pytest.raises(ConfigError, match="python -m data_prep.demo"):  # data=demo before the demo corpus exists
        prepare_config(make_cfg(["experiment=demo", f"paths.demo_dir={tmp_path}/corpus"], tmp_path))


def test_the_demo_command_run_again_is_refused_before_it_writes_anything(tmp_path):
    """README: `python -m clip_pl.train experiment=demo` after `make demo` (runs/demo holds checkpoints). The
    refusal (experiment=demo sets resume=none) must leave the finished run as it was: Hydra writes .hydra/ and
    train.log into the run directory before the task function runs, and the W&B logger starts a run; the checks
    run before both (clip_pl.config_checks.RefuseBeforeTheRunDirectory). The message names the override to use."""
    from hydra import compose, initialize_config_dir

    from clip_pl.config_dir import config_dir
    from tests.support.fake_shards import write_shards

    write_shards(str(tmp_path / "demo_out" / "corpus" / "shards"), [4], image_px=(40, 56))
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"the finished demo's weights")
    (run / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"# the finished demo's {name}\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    env = {k: v for k, v in os.environ.items() if k not in ("CLIP_PL_ROOT", "RANK", "SLURM_PROCID", "SLURM_JOB_ID")}
    result = subprocess.run(
        [sys.executable, "-m", "clip_pl.train", "experiment=demo"],  # the README's command, from the folder it ran in
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert f"resume=none but {run} already holds checkpoints" in result.stderr, result.stderr[-3000:]
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # .hydra/*.yaml byte for byte, no train.log, no wandb/ offline run
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo"]
    assert f"run_name=demo-2 to train anew in {tmp_path / 'runs' / 'demo-2'}" in result.stderr
    assert "resume=auto to continue the run" in result.stderr and "Traceback" not in result.stderr

    # the overrides it names are accepted
    for override in ("run_name=demo-2", "resume=auto"):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=["experiment=demo", f"paths.root_dir={tmp_path}", override])
        prepare_config(cfg)
