"""The evaluation suite's task list: a YAML file read and checked in full before any model is loaded.

    tasks:
      digits:                                  # the task's name (a row of the table)
        type: zeroshot_classification          # | retrieval | linear_probe
        data: test/                            # ImageFolder, shards, or a clip_benchmark-style folder
        classnames: classnames.txt             # built-in ("imagenet"), a file, or a list
        templates: [a photo of the number {}.] # built-in ("openai_imagenet"), a file, or a list
        metrics: [acc1, acc5, mean_per_class_recall]   # optional: a subset (default: all of the type)
        main_metric: acc1                      # optional: what the suite average takes from this task
      captions:
        type: retrieval
        data: {format: wds, path: 'captions/{0000..0001}.tar', text_key: txt, caption_separator: "\\n"}
      probe:
        type: linear_probe
        train: probe/train                     # labelled data, as for zero-shot
        test: probe/test
        val: null                              # null: a seeded val_fraction of train picks the regularisation
        fewshot_k: -1                          # k > 0: k training images per class

``data`` (and ``train`` / ``val`` / ``test``) is a path, or ``{format, path, split, label_key, text_key,
caption_separator}`` with format ``imagefolder`` (``root/<class>/<image>``), ``wds`` (shards in the training
grammar, integer ``.cls`` labels or ``.txt`` captions) or ``clip_benchmark`` (``root/<split>/*.tar`` with
``root/classnames.txt`` and ``root/zeroshot_classification_templates.txt``, as clip_benchmark's ``wds_*``
sets; their ``{c}`` templates are read as ``{}``). A bare path is a clip_benchmark folder when it holds
``classnames.txt`` and a ``<split>`` folder, an ImageFolder when it has class folders, shards otherwise.
Relative paths are relative to the task list's folder. Every problem is reported with its fix as a
:class:`TaskListError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clip_pl.eval import datasets
from clip_pl.eval.labels import (
    BUILTIN_CLASSNAMES,
    BUILTIN_TEMPLATES,
    check_templates,
    check_unique,
    load_classnames,
    load_templates,
)

ZEROSHOT, RETRIEVAL, LINEAR_PROBE = "zeroshot_classification", "retrieval", "linear_probe"
TASK_TYPES = (ZEROSHOT, RETRIEVAL, LINEAR_PROBE)
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
LINEAR_PROBE_METRICS = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")
DEFAULT_RECALL_K = (1, 5, 10)
# DataComp's choice: top-1 for classification, the mean of both directions' recall@1 for retrieval.
DEFAULT_MAIN_METRIC = {ZEROSHOT: "acc1", RETRIEVAL: "mean_recall@1", LINEAR_PROBE: "lp_acc1"}
DATA_FORMATS = ("imagefolder", "wds", "clip_benchmark")
CLIP_BENCHMARK_CLASSNAMES = "classnames.txt"
CLIP_BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"

_COMMON_KEYS = {"type", "metrics", "main_metric", "batch_size"}
_KEYS = {
    ZEROSHOT: _COMMON_KEYS | {"data", "classnames", "templates"},
    RETRIEVAL: _COMMON_KEYS | {"data", "recall_k"},
    LINEAR_PROBE: _COMMON_KEYS | {"train", "val", "test", "classnames", "fewshot_k", "val_fraction", "seed"},
}
_DATA_KEYS = {"format", "path", "split", "label_key", "text_key", "caption_separator"}


class TaskListError(ValueError):
    """A task list that cannot run; the message names the file, the task and the fix."""


@dataclass(frozen=True)
class DataSpec:
    """One evaluation set, resolved: ``path`` is an ImageFolder directory or a shard spec for the loaders."""

    format: str
    path: str | list[str]
    label_key: str = "cls"
    text_key: str = "txt"
    caption_separator: str | None = "\n"
    root: Path | None = None  # the clip_benchmark folder, for its class names and templates


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    metrics: tuple[str, ...]
    main_metric: str
    data: DataSpec | None = None  # zero-shot, retrieval
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    recall_k: tuple[int, ...] = DEFAULT_RECALL_K
    train: DataSpec | None = None  # linear probe
    val: DataSpec | None = None
    test: DataSpec | None = None
    fewshot_k: int = -1
    val_fraction: float = 0.2
    seed: int = 0
    batch_size: int | None = None


def _fail(where: str, problem: str, fix: str) -> TaskListError:
    return TaskListError(f"{where}: {problem.rstrip('.')} — {fix}")


def _resolve(path: str, base: Path) -> str:
    if "://" in path or path.startswith("pipe:"):
        return path
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else base / expanded)


def _is_clip_benchmark_root(path: Path, split: str) -> bool:
    return (path / CLIP_BENCHMARK_CLASSNAMES).is_file() and (path / split).is_dir()


def parse_data(spec: Any, base: Path, where: str, split: str = "test") -> DataSpec:
    """A ``data`` entry → :class:`DataSpec`, with the data checked to exist."""
    if spec is None or spec == "":
        raise _fail(where, "no data given", "set data: to an ImageFolder directory, shards, or a clip_benchmark folder")
    if isinstance(spec, (str, list)):
        spec = {"path": spec}
    if not isinstance(spec, Mapping):
        raise _fail(where, f"data must be a path or a mapping, not {type(spec).__name__}", "write data: PATH")
    unknown = set(spec) - _DATA_KEYS
    if unknown:
        raise _fail(where, f"unknown data key(s) {sorted(unknown)}", f"use only {sorted(_DATA_KEYS)}")
    raw = spec.get("path")
    if not raw:
        raise _fail(where, "data has no path", "add path: to the data mapping")
    paths = [_resolve(str(p), base) for p in raw] if isinstance(raw, list) else _resolve(str(raw), base)
    split = str(spec.get("split", split))
    fmt = spec.get("format")
    if fmt is not None and fmt not in DATA_FORMATS:
        raise _fail(where, f"unknown data format {fmt!r}", f"choose one of {list(DATA_FORMATS)}")
    single = None if isinstance(paths, list) else Path(paths)
    if fmt is None:
        if single is not None and single.is_dir() and _is_clip_benchmark_root(single, split):
            fmt = "clip_benchmark"
        else:
            try:
                fmt = "imagefolder" if datasets.is_imagefolder(paths) else "wds"
            except FileNotFoundError as e:
                raise _fail(
                    where,
                    f"data {raw!r} not found ({e})",
                    "fix the path (relative paths start at the task list's folder)",
                ) from None
    options = {k: spec[k] for k in ("label_key", "text_key", "caption_separator") if k in spec}
    if fmt == "clip_benchmark":
        if single is None or not _is_clip_benchmark_root(single, split):
            raise _fail(
                where,
                f"{raw!r} is not a clip_benchmark folder with split {split!r}",
                f"it needs {CLIP_BENCHMARK_CLASSNAMES} and a {split}/ folder of .tar shards",
            )
        shards = str(single / split)
        _check_shards(shards, where)
        return DataSpec("clip_benchmark", shards, root=single, **options)
    if fmt == "imagefolder":
        if single is None or not single.is_dir():
            raise _fail(where, f"ImageFolder {raw!r} does not exist", "fix the path (root/<class>/<image>)")
        return DataSpec("imagefolder", str(single), **options)
    _check_shards(paths, where)
    return DataSpec("wds", paths, **options)


def _check_shards(spec: str | list[str], where: str) -> None:
    try:
        datasets.expand_shards(spec)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(where, f"shards {spec!r} not usable ({e})", "fix the shard path or pattern") from None


def class_folders(root: str) -> list[str]:
    return sorted(
        (p.name for p in Path(root).iterdir() if p.is_dir()),
        key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n),
    )


def _relative_file(spec: Any, builtins: Mapping, base: Path) -> Any:
    """A file name in the list is relative to the list's folder; built-in names and lists stay as they are."""
    return _resolve(spec, base) if isinstance(spec, str) and spec not in builtins else spec


def _classnames(entry: Mapping, data: DataSpec, where: str, base: Path) -> list[str]:
    """The given class names, else the clip_benchmark folder's, else the ImageFolder's folder names."""
    spec = _relative_file(entry.get("classnames"), BUILTIN_CLASSNAMES, base)
    try:
        if spec is not None:
            names = load_classnames(spec if isinstance(spec, str) else list(spec))
        elif data.root is not None:
            names = load_classnames(str(data.root / CLIP_BENCHMARK_CLASSNAMES))
        elif data.format == "imagefolder":
            names = class_folders(str(data.path))
            if all(n.isdigit() for n in names):
                raise _fail(
                    where,
                    "class folders are numbers and no classnames are given",
                    "set classnames: to a file or list (line k names class k)",
                )
            names = check_unique(names, "class folders")
        else:
            raise _fail(where, "no classnames for WebDataset shards", "set classnames: to a built-in, a file or a list")
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, TaskListError):
            raise
        raise _fail(where, str(e), "fix the classnames entry") from None
    if data.format == "imagefolder":
        _check_folders_match(names, data.path, where)
    return names


def _check_folders_match(names: Sequence[str], root: str, where: str) -> None:
    folders = class_folders(root)
    if not folders:
        raise _fail(where, f"ImageFolder {root!r} has no class folders", "lay it out as root/<class>/<image>")
    if all(f.isdigit() for f in folders):
        if int(folders[-1]) >= len(names):
            raise _fail(
                where,
                f"class folder {folders[-1]!r} but only {len(names)} class names",
                "give one class name per class index (line k names folder k)",
            )
        return
    if len(folders) != len(names):
        raise _fail(
            where,
            f"{len(folders)} class folders ({folders[:4]}…) but {len(names)} class names",
            "give one class name per folder, in the folders' sorted order",
        )
    if set(folders) == set(names) and list(folders) != list(names):
        raise _fail(
            where,
            "the class names are the folder names in another order, so classes would be swapped",
            f"list them in sorted folder order ({folders[:4]}…) or leave classnames out",
        )


def _templates(entry: Mapping, data: DataSpec, where: str, base: Path) -> list[str]:
    spec = _relative_file(entry.get("templates"), BUILTIN_TEMPLATES, base)
    if spec is None and data.root is not None:
        spec = str(data.root / CLIP_BENCHMARK_TEMPLATES)
    if spec is None:
        raise _fail(
            where,
            "no templates",
            "set templates: to openai_imagenet, simple_imagenet, a file or a list "
            "of prompts with {} where the class name goes",
        )
    try:
        if isinstance(spec, str) and Path(spec).is_file():
            # clip_benchmark's files write {c}; ours {}.
            lines = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
            return check_templates([line.replace("{c}", "{}") for line in lines], f"templates {spec!r}")
        return load_templates(spec if isinstance(spec, str) else [str(t).replace("{c}", "{}") for t in spec])
    except (FileNotFoundError, ValueError) as e:
        raise _fail(where, str(e), "give at least one prompt with {} where the class name goes") from None


def _metrics(entry: Mapping, task_type: str, allowed: Sequence[str], where: str) -> tuple[tuple[str, ...], str]:
    metrics = tuple(entry.get("metrics") or allowed)
    unknown = [m for m in metrics if m not in allowed]
    if unknown:
        raise _fail(where, f"unknown metric(s) {unknown} for {task_type}", f"choose from {list(allowed)}")
    main = entry.get("main_metric") or DEFAULT_MAIN_METRIC[task_type]
    if main not in metrics:
        raise _fail(
            where,
            f"main_metric {main!r} is not among the task's metrics {list(metrics)}",
            "add it to metrics or pick one of them",
        )
    return metrics, main


def retrieval_metric_names(ks: Sequence[int]) -> tuple[str, ...]:
    names = [f"{way}_retrieval_recall@{k}" for k in ks for way in ("image", "text")]
    return tuple(names) + tuple(f"mean_recall@{k}" for k in ks)


def parse_task(name: str, entry: Any, base: Path, source: str) -> Task:
    where = f"task list {source}, task {name!r}"
    if not isinstance(entry, Mapping):
        raise _fail(where, "a task must be a mapping", "give it type: and data: keys")
    task_type = entry.get("type")
    if task_type not in TASK_TYPES:
        raise _fail(where, f"unknown type {task_type!r}", f"choose one of {list(TASK_TYPES)}")
    unknown = set(entry) - _KEYS[task_type]
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)} for {task_type}", f"use only {sorted(_KEYS[task_type])}")
    batch_size = entry.get("batch_size")
    if task_type == ZEROSHOT:
        data = parse_data(entry.get("data"), base, where)
        classnames = _classnames(entry, data, where, base)
        templates = _templates(entry, data, where, base)
        metrics, main = _metrics(entry, task_type, CLASSIFICATION_METRICS, where)
        if main == "acc5" and len(classnames) < 5:
            raise _fail(
                where,
                f"main_metric acc5 with {len(classnames)} classes (top-5 needs at least 5)",
                "use acc1 or mean_per_class_recall",
            )
        return Task(
            name,
            task_type,
            metrics,
            main,
            data=data,
            classnames=tuple(classnames),
            templates=tuple(templates),
            batch_size=batch_size,
        )
    if task_type == RETRIEVAL:
        data = parse_data(entry.get("data"), base, where)
        if data.format == "imagefolder":
            raise _fail(
                where,
                "retrieval needs image-caption shards, not an ImageFolder",
                "point data: at WebDataset shards whose .txt holds the captions, one per line",
            )
        ks = tuple(int(k) for k in entry.get("recall_k") or DEFAULT_RECALL_K)
        if not ks or min(ks) <= 0:
            raise _fail(where, f"recall_k {list(ks)} must be positive integers", "e.g. recall_k: [1, 5, 10]")
        metrics, main = _metrics(entry, task_type, retrieval_metric_names(ks), where)
        return Task(name, task_type, metrics, main, data=data, recall_k=ks, batch_size=batch_size)
    train = parse_data(entry.get("train"), base, f"{where} (train)", split="train")
    test = parse_data(entry.get("test"), base, f"{where} (test)", split="test")
    val = parse_data(entry["val"], base, f"{where} (val)", split="val") if entry.get("val") is not None else None
    # A probe learns its classes from the labels: names are optional (checked against the folders if given).
    classnames = _classnames(entry, train, where, base) if entry.get("classnames") else ()
    fewshot_k = int(entry.get("fewshot_k", -1))
    if fewshot_k == 0 or fewshot_k < -1:
        raise _fail(where, f"fewshot_k={fewshot_k}", "use -1 (all training images) or k > 0 images per class")
    fraction = float(entry.get("val_fraction", 0.2))
    if not 0 < fraction < 1:
        raise _fail(where, f"val_fraction={fraction} must lie strictly between 0 and 1", "e.g. val_fraction: 0.2")
    metrics, main = _metrics(entry, task_type, LINEAR_PROBE_METRICS, where)
    return Task(
        name,
        task_type,
        metrics,
        main,
        train=train,
        val=val,
        test=test,
        classnames=tuple(classnames),
        fewshot_k=fewshot_k,
        val_fraction=fraction,
        seed=int(entry.get("seed", 0)),
        batch_size=batch_size,
    )


def load_task_list(path: str | Path) -> list[Task]:
    """Every task of the YAML file at ``path``, checked (data present, class names and templates usable)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskListError(
            f"task list {str(path)!r} does not exist — pass eval.task_list=PATH to a YAML file "
            f"(see clip_pl/eval/tasks.py for the format)"
        )
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskListError(f"task list {str(path)!r} is not valid YAML ({e}) — fix the syntax") from None
    tasks = document.get("tasks") if isinstance(document, Mapping) else None
    if not isinstance(tasks, Mapping) or not tasks:
        raise TaskListError(
            f"task list {str(path)!r} has no tasks — write `tasks:` followed by one mapping per "
            f"task (name: {{type: …, data: …}})"
        )
    return [parse_task(str(name), entry, path.parent.resolve(), str(path)) for name, entry in tasks.items()]
