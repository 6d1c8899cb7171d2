"""open_clip <-> clip_pl weight interchange: identical embeddings both ways, formats, clear errors.

pytest tests/test_interchange.py
"""

from __future__ import annotations

import json
import pickle
import warnings

import open_clip
import pytest
import torch

import clip_pl.inference
from clip_pl.interchange import (
    ArchitectureMismatchError,
    ClipPlCheckpoint,
    OpenClipExport,
    export_open_clip,
    load_open_clip_weights,
    main,
    read_clip_pl_checkpoint,
    read_state_dict,
    save_clip_pl_checkpoint,
)
from clip_pl.model import build_clip, get_tokenizer, image_transforms, resolve_model_config
from tests.support.eval import TINY_RESNET, TINY_VIT, random_images, tiny_checkpoint, tiny_model

# Compares two computations of the same numbers: also run under ATEN_CPU_CAPABILITY=avx2 in CI (.ci/run).
pytestmark = pytest.mark.numerics


def _inputs(image_size: int, context_length: int = 77, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    preprocess = image_transforms(image_size)[1]
    images = torch.stack([preprocess(im) for im in random_images(n, size=image_size + 10)])
    tokens = get_tokenizer(context_length)(["a photo of a dog.", "two cats on a sofa"][:n])
    return images, tokens


@torch.no_grad()
def _embeddings(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    return model.encode_image(images), model.encode_text(tokens)


def _assert_same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("arch", [pytest.param("ViT-B-32", marks=pytest.mark.slow), "RN50"])  # ViT-B/32: ~15 s
def test_named_arch_round_trip_gives_identical_embeddings(arch, tmp_path):
    """open_clip random init -> clip_pl -> clip_pl checkpoint -> export -> open_clip.create_model(arch, pretrained)."""
    torch.manual_seed(0)
    reference = open_clip.create_model(arch).eval()
    with torch.no_grad():  # a non-default temperature proves logit_scale travels too
        reference.logit_scale.fill_(3.21)
    source = tmp_path / "open_clip.pt"
    torch.save(reference.state_dict(), source)
    images, tokens = _inputs(224, n=1)  # one of each: full-size towers are slow on 2 CPU cores
    expected = _embeddings(reference, images, tokens)

    config = resolve_model_config(arch=arch)
    imported = build_clip(config)
    load_open_clip_weights(imported, source)
    _assert_same(_embeddings(imported, images, tokens), expected)
    assert imported.logit_scale.item() == pytest.approx(3.21)
    del reference

    checkpoint = save_clip_pl_checkpoint(imported, config, tmp_path / "clip_pl.ckpt", arch=arch)
    del imported
    exported = export_open_clip(checkpoint, tmp_path / "export")
    assert exported.named_arch and exported.model_name == arch
    reloaded = open_clip.create_model(arch, pretrained=str(exported.weights))
    _assert_same(_embeddings(reloaded, images, tokens), expected)


@pytest.mark.parametrize("arch_config", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_custom_arch_exports_with_its_json_config(arch_config, tmp_path):
    checkpoint, model, config = tiny_checkpoint(tmp_path / "tiny.ckpt", arch_config)
    images, tokens = _inputs(config["vision_cfg"]["image_size"], 16)
    expected = _embeddings(model, images, tokens)

    exported = export_open_clip(checkpoint, tmp_path / "export", name=f"tiny-{id(arch_config)}")
    assert not exported.named_arch and exported.config_json.is_file()
    open_clip.add_model_config(exported.config_json)
    by_name = open_clip.create_model(exported.model_name, pretrained=str(exported.weights))
    _assert_same(_embeddings(by_name, images, tokens), expected)
    by_dir = open_clip.create_model(f"local-dir:{exported.directory}")
    _assert_same(_embeddings(by_dir, images, tokens), expected)
    # and back: the exported directory loads into clip_pl
    loaded = clip_pl.inference.load(exported.directory, device="cpu").model
    _assert_same(_embeddings(loaded.clip, images, tokens), expected)


def test_a_locked_resnet_tower_exports_and_loads(tmp_path):
    """model.lock_image on a ResNet swaps its BatchNorm for FrozenBatchNorm2d, which keeps no
    num_batches_tracked: such checkpoints must still export and load (they used to fail as a mismatch)."""
    from clip_pl.towers import lock_towers

    model, config = tiny_model(TINY_RESNET)
    lock_towers(model, {"lock_image": True})
    assert not any(k.endswith("num_batches_tracked") for k in model.state_dict() if k.startswith("visual."))
    images, tokens = _inputs(config["vision_cfg"]["image_size"], 16)
    expected = _embeddings(model, images, tokens)
    checkpoint = save_clip_pl_checkpoint(model, config, tmp_path / "locked.ckpt")
    exported = export_open_clip(checkpoint, tmp_path / "export", name="tiny-locked-rn")
    open_clip.add_model_config(exported.config_json)
    _assert_same(
        _embeddings(open_clip.create_model(exported.model_name, pretrained=str(exported.weights)), images, tokens),
        expected,
    )
    _assert_same(_embeddings(clip_pl.inference.load(checkpoint, device="cpu").model.clip, images, tokens), expected)


def test_named_arch_with_changed_settings_is_exported_under_its_own_name(tmp_path):
    def export(config: dict, arch: str, **kwargs) -> OpenClipExport:
        with torch.device("meta"):  # export only needs names and shapes to decide
            state = build_clip(config).state_dict()
        return export_open_clip(
            ClipPlCheckpoint(config, arch, {k: torch.zeros(v.shape) for k, v in state.items()}),
            tmp_path / f"export{len(list(tmp_path.iterdir()))}",  # a new folder each (a used one is refused)
            **kwargs,
        )

    # patch dropout is a training-time setting: the architecture is still plain ViT-S-32
    assert export(resolve_model_config(arch="ViT-S-32", patch_dropout=0.5), "ViT-S-32").named_arch
    resized = export(resolve_model_config(arch="ViT-S-32", image_size=64), "ViT-S-32")
    assert not resized.named_arch and resized.model_name == "ViT-S-32-custom"
    assert json.loads(resized.config_json.read_text())["vision_cfg"]["image_size"] == 64
    assert export(resolve_model_config(arch="ViT-S-32"), "ViT-S-32", name="mine").model_name == "mine"


def test_safetensors_export_loads_in_open_clip(tmp_path):
    checkpoint, model, config = tiny_checkpoint(tmp_path / "tiny.ckpt")
    exported = export_open_clip(checkpoint, tmp_path / "export", safetensors=True)
    assert exported.weights.name == "open_clip_model.safetensors"
    reloaded = open_clip.create_model(f"local-dir:{exported.directory}").eval()
    images, tokens = _inputs(32, 16)
    _assert_same(_embeddings(reloaded, images, tokens), _embeddings(model, images, tokens))


def test_wrapped_and_prefixed_formats_load(tmp_path):
    model, config = tiny_model(seed=1)
    images, tokens = _inputs(32, 16)
    expected = _embeddings(model, images, tokens)
    state = model.state_dict()
    files = {
        "train_ckpt.pt": {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
        "lightning.ckpt": {
            "hyper_parameters": {"model_config": config, "arch": None},
            "state_dict": {
                **{f"model._orig_mod.{k}": v for k, v in state.items()},
                "loss.labels_cache": torch.arange(4),
            },
        },
    }
    for name, payload in files.items():
        torch.save(payload, tmp_path / name)
        target, _ = tiny_model(seed=2)
        load_open_clip_weights(target, tmp_path / name)
        _assert_same(_embeddings(target, images, tokens), expected)


def test_openai_torchscript_archive_loads(tmp_path):
    model, _ = tiny_model(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's files are not
        scripted = torch.jit.script(model)
        scripted.save(str(tmp_path / "openai.pt"))
    target, _ = tiny_model(seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        load_open_clip_weights(target, tmp_path / "openai.pt")
    images, tokens = _inputs(32, 16)
    _assert_same(_embeddings(target, images, tokens), _embeddings(model, images, tokens))
    with pytest.raises(ValueError, match="TorchScript"):
        read_state_dict(tmp_path / "openai.pt", allow_torchscript=False)


def test_wrong_architecture_names_the_mismatching_keys(tmp_path):
    small, _ = tiny_model(TINY_VIT)
    torch.save(small.state_dict(), tmp_path / "vit.pt")
    resnet, _ = tiny_model(TINY_RESNET)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    with pytest.raises(ArchitectureMismatchError) as err:
        load_open_clip_weights(resnet, tmp_path / "vit.pt")
    message = str(err.value)
    assert "missing from the file" in message and "visual.attnpool" in message
    assert "in the file but not in the model" in message and "visual.conv1.weight" not in message.split("shape")[0]
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())  # nothing half-loaded

    wider = {**TINY_VIT, "embed_dim": 48}
    wide, _ = tiny_model(wider)
    with pytest.raises(ArchitectureMismatchError, match=r"text_projection: file \(64, 32\) vs model \(64, 48\)"):
        load_open_clip_weights(wide, tmp_path / "vit.pt")


def test_missing_files_and_non_checkpoints_are_clear_errors(tmp_path):
    model, _ = tiny_model()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_open_clip_weights(model, tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_pl.inference.load(tmp_path / "nope.ckpt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="arch="):
        read_clip_pl_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="directory"):
        read_clip_pl_checkpoint(tmp_path)


class _Arbitrary:  # a pickled class: torch.load(weights_only=True) must refuse to build it
    pass


def test_checkpoints_are_read_with_weights_only(tmp_path):
    model, config = tiny_model()
    path = tmp_path / "unsafe.ckpt"
    with open(path, "wb") as f:
        torch.save(
            {"hyper_parameters": {"model_config": config, "arch": None, "extra": _Arbitrary()}, "state_dict": {}},
            f,
            pickle_module=pickle,
        )
    with pytest.raises(ValueError, match="weights_only=True"):
        read_clip_pl_checkpoint(path)


def test_command_line_import_and_export(tmp_path, capsys):
    model, config = tiny_model(seed=5)
    source = tmp_path / "weights.pt"
    torch.save(model.state_dict(), source)
    checkpoint = save_clip_pl_checkpoint(model, config, tmp_path / "tiny.ckpt")
    main(["export", str(checkpoint), str(tmp_path / "out"), "--name", "tiny-cli"])
    assert "add_model_config" in capsys.readouterr().out
    assert (tmp_path / "out" / "tiny-cli.json").is_file()
    loaded = read_clip_pl_checkpoint(checkpoint)
    assert loaded.model_config == config and loaded.arch is None

    main(["import", str(source), str(tmp_path / "out" / "tiny-cli.json"), str(tmp_path / "back.ckpt")])
    imported = read_clip_pl_checkpoint(tmp_path / "back.ckpt")
    assert imported.arch is None and imported.model_config == config
    assert all(torch.equal(imported.state_dict[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """One tiny clip_pl checkpoint (no EMA weights) for the command-line refusals below."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt")[0]


def _listing(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_refuses_a_non_empty_folder_and_overwrite_replaces_a_previous_export(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "exported"
    main(["export", str(tiny_ckpt), str(out), "--name", "old-arch"])
    (out / "old-arch.json").write_text('{"stale": true}\n')  # what a re-export must never leave behind
    before = _listing(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["export", str(tiny_ckpt), str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "old-arch.json" in err and "--overwrite" in err and "Traceback" not in err
    assert _listing(out) == before  # nothing written, nothing removed
    with pytest.raises(FileExistsError, match="is not empty"):  # the Python API too, before reading the checkpoint
        export_open_clip(tmp_path / "no-such.ckpt", out)

    main(["export", str(tiny_ckpt), str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == [
        "clip_pl-custom.json",
        "open_clip_config.json",
        "open_clip_pytorch_model.bin",
    ]
    reloaded = open_clip.create_model(f"local-dir:{out}").eval()
    model, config = tiny_model()
    images, tokens = _inputs(config["vision_cfg"]["image_size"], 16)
    _assert_same(_embeddings(reloaded, images, tokens), _embeddings(model, images, tokens))

    (out / "notes.txt").write_text("mine\n")  # --overwrite replaces an export, never files of the user's
    with pytest.raises(SystemExit):
        main(["export", str(tiny_ckpt), str(out), "--overwrite"])
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").is_file()
    assert (out / "open_clip_pytorch_model.bin").is_file()


def test_export_ema_of_a_checkpoint_without_ema_is_a_one_line_error(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", str(tiny_ckpt), str(tmp_path / "out"), "--ema"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m clip_pl.interchange export: error:"), err
    assert "holds no EMA weights" in err and "callbacks.ema.enabled=true" in err and "without --ema" in err
    assert not (tmp_path / "out").exists()
