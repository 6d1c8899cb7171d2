"""A plain (not editable) `pip install .` gives console scripts that find their configs from any
directory: the Hydra configs ship inside the package (clip_pl/conf, clip_pl.config_dir).

    pytest tests/test_install.py      # ~30 s: a fresh venv, a wheel build, two --cfg job runs

The fresh venv reuses this interpreter's installed dependencies through a one-line .pth file (a plain
path line: the .pth files of that folder, among them this checkout's editable install, are not
processed), so only clip_pl itself is built and installed, from a copy of the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _copy_repository(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".venv", "runs", "demo_out", "outputs")
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, target / name)
    for name in ("clip_pl", "data_prep"):
        shutil.copytree(REPO / name, target / name, ignore=ignore)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("install")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # This environment's dependencies (torch, hydra, …), without installing them again.
    Path(purelib, "_clip_pl_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = _copy_repository(root / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--ignore-installed",
            str(source),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    shutil.rmtree(source)  # nothing may still point into the copy
    workdir = root / "empty"
    workdir.mkdir()
    return {"bin": env_dir / "bin", "env_dir": env_dir, "workdir": workdir, "env": env}


def _run(installed, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(installed["bin"] / command[0]), *command[1:]],
        cwd=installed["workdir"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_installed_package_is_the_copy_in_the_fresh_venv(installed):
    result = _run(
        installed,
        "python",
        "-c",
        "import clip_pl, clip_pl.config_dir as c; print(clip_pl.__file__); print(c.config_dir())",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module_file, conf = result.stdout.split()
    assert Path(module_file).resolve().is_relative_to(installed["env_dir"].resolve()), module_file
    assert Path(conf).is_relative_to(Path(module_file).parent) and (Path(conf) / "train.yaml").is_file()


def test_clip_pl_train_prints_its_config_from_any_directory(installed):
    result = _run(installed, "clip-pl-train", "--cfg", "job", "debug=smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "_target_: clip_pl.module.CLIPModule.from_options" in result.stdout
    assert "_target_: clip_pl.data.SyntheticDataModule" in result.stdout  # debug=smoke's data
    assert not any(installed["workdir"].iterdir())  # --cfg job runs nothing and writes nothing


def test_clip_pl_eval_prints_its_config_from_any_directory(installed):
    result = _run(installed, "clip-pl-eval", "--cfg", "job", "checkpoint=x.ckpt", "eval=imagenet_zeroshot")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint: x.ckpt" in result.stdout and "clip_pl.callbacks.ZeroShotCallback" in result.stdout
