"""Task lists: every data layout and class-name / template source is read, and a bad list is refused with
its fix before any model is loaded.

    pytest tests/eval/test_task_list.py
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException

from clip_pl.config_dir import config_dir
from clip_pl.eval.__main__ import run
from clip_pl.eval.suite import evaluate_tasks
from clip_pl.eval.tasks import TaskListError, load_task_list
from tests.support.eval import (
    CLASSNAMES,
    TEMPLATES,
    labelled_samples,
    random_images,
    tiny_model,
    write_imagefolder,
    write_shards,
)
from tests.support.eval_tasks import labelled_folder, write_task_list, zeroshot_task_yaml


def _refused(tmp_path, body: str, match: str) -> TaskListError:
    path = write_task_list(tmp_path / "tasks.yaml", "tasks:\n" + body)
    with pytest.raises(TaskListError, match=match) as caught:
        load_task_list(path)
    assert " — " in str(caught.value) and "tasks.yaml" in str(caught.value)  # where, then the fix
    return caught.value


def test_bad_lists_are_refused_with_the_fix(tmp_path):
    labelled_folder(tmp_path / "digits", n=14)
    _refused(tmp_path, "  a:\n    type: zeroshot\n    data: digits\n", r"unknown type 'zeroshot' — choose one of")
    _refused(tmp_path, zeroshot_task_yaml("nowhere"), r"data 'nowhere' not found")
    _refused(tmp_path, "  a:\n    type: retrieval\n", r"no data given — set data:")
    _refused(
        tmp_path,
        zeroshot_task_yaml("digits").replace("templates: ", "templatez: "),
        r"unknown key\(s\) \['templatez'\]",
    )
    # Seven class folders 0..6, five names: folder 6 would have no name.
    short = zeroshot_task_yaml("digits").replace(str(list(CLASSNAMES)), str(list(CLASSNAMES[:5])))
    _refused(tmp_path, short, r"class folder '6' but only 5 class names")
    _refused(
        tmp_path,
        zeroshot_task_yaml("digits").replace(str(list(TEMPLATES)), "[]"),
        r"the list is empty — give at least one prompt",
    )
    _refused(tmp_path, zeroshot_task_yaml("digits").replace(str(list(TEMPLATES)), "['a photo']"), r"exactly one '\{\}'")
    _refused(tmp_path, zeroshot_task_yaml("digits") + "    metrics: [acc2]\n", r"unknown metric\(s\) \['acc2'\]")
    _refused(tmp_path, "  a:\n    type: retrieval\n    data: digits\n", r"needs image-caption shards")
    _refused(
        tmp_path,
        "  a:\n    type: linear_probe\n    train: digits\n    test: digits\n    fewshot_k: 0\n",
        r"fewshot_k=0 — use -1",
    )
    with pytest.raises(TaskListError, match="has no tasks"):
        load_task_list(write_task_list(tmp_path / "empty.yaml", "tasks: {}\n"))
    with pytest.raises(TaskListError, match="does not exist — pass eval.task_list"):
        load_task_list(tmp_path / "missing.yaml")


def test_named_class_folders_must_match_the_class_names(tmp_path):
    images = random_images(4, seed=3)
    for i, name in enumerate(["circle", "square", "circle", "square"]):
        (tmp_path / "shapes" / name).mkdir(parents=True, exist_ok=True)
        images[i].save(tmp_path / "shapes" / name / f"{i}.png")
    task = "  shapes:\n    type: zeroshot_classification\n    data: shapes\n    templates: ['a {}']\n"
    assert load_task_list(write_task_list(tmp_path / "ok.yaml", "tasks:\n" + task))[0].classnames == (
        "circle",
        "square",
    )
    _refused(tmp_path, task + "    classnames: [square, circle]\n", r"folder names in another order")
    _refused(tmp_path, task + "    classnames: [circle, square, star]\n", r"2 class folders .* but 3 class names")
    _refused(tmp_path, task + "    main_metric: acc5\n", r"main_metric acc5 with 2 classes")


def test_a_bad_list_fails_before_the_checkpoint_is_read(tmp_path):
    path = write_task_list(tmp_path / "tasks.yaml", "tasks:\n  a:\n    type: zeroshot\n")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "eval_app", overrides=[f"checkpoint={tmp_path / 'missing.ckpt'}", "eval=suite", f"eval.task_list={path}"]
        )
        no_list = compose("eval_app", overrides=[f"checkpoint={tmp_path / 'missing.ckpt'}", "eval=suite"])
    with pytest.raises(InstantiationException, match="unknown type 'zeroshot'"):  # not the missing checkpoint
        run(cfg, "suite")
    with pytest.raises(InstantiationException, match="no task list given; pass eval.task_list"):
        run(no_list, "suite")


def test_a_clip_benchmark_folder_and_labelled_shards_read_like_the_imagefolder(tmp_path):
    images = random_images(14, seed=8)
    labels = [i % len(CLASSNAMES) for i in range(14)]
    write_imagefolder(tmp_path / "folder", images, labels)
    write_shards(tmp_path / "wds_set" / "test", labelled_samples(images, labels), 2)  # clip_benchmark's layout
    (tmp_path / "wds_set" / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (tmp_path / "wds_set" / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in TEMPLATES) + "\n"
    )
    write_shards(tmp_path / "plain", labelled_samples(images, labels), 3)
    path = write_task_list(
        tmp_path / "tasks.yaml",
        "tasks:\n"
        + zeroshot_task_yaml("folder", "folder")
        + "  benchmark:\n    type: zeroshot_classification\n    data: wds_set\n"
        + zeroshot_task_yaml("{format: wds, path: plain}", "shards"),
    )
    tasks = load_task_list(path)
    assert tasks[1].data.format == "clip_benchmark" and tasks[1].templates == tuple(TEMPLATES)
    assert tasks[1].classnames == tuple(CLASSNAMES) and tasks[2].data.format == "wds"
    model, config = tiny_model(seed=2)
    results = evaluate_tasks(model, config, tasks, batch_size=4)
    assert results["folder"] == results["benchmark"] == results["shards"]
    assert results["folder"]["samples"] == 14 and set(results["folder"]) >= {"acc1", "acc5", "mean_per_class_recall"}


def test_the_documented_task_lists_use_only_known_types_and_keys():
    """The YAML examples of README.md and docs/evaluation.md (their /data paths do not exist here)."""
    import re
    from pathlib import Path

    import yaml

    from clip_pl.eval.tasks import _DATA_KEYS, _KEYS

    repo = Path(__file__).resolve().parents[2]
    blocks = [
        b
        for doc in ("README.md", "docs/evaluation.md")
        for b in re.findall(r"```yaml\n(.*?)```", (repo / doc).read_text(), flags=re.S)
    ]
    tasks = [task for block in blocks for task in yaml.safe_load(block)["tasks"].values()]
    assert len(tasks) >= 6
    for task in tasks:
        assert set(task) <= _KEYS[task["type"]], task
        for data in (task.get(k) for k in ("data", "train", "val", "test")):
            assert data is None or isinstance(data, str) or set(data) <= _DATA_KEYS, task
