"""The house has floors: no module of clip_pl/ or data_prep/ imports one from a floor above it.

The import graph is read with ``ast`` (nothing is imported or run): every ``import`` and
``from … import`` of the project, at module level or inside a function (a lazy import is a
dependency too). A package ``__init__`` runs whenever anything inside the package is imported,
so it must stay a facade: no project import at module level but the lazy-export helper
(``clip_pl._lazy``), or importing ``clip_pl.data.tarstream`` would drag the whole data pipeline in.
Its lazy re-exports are not edges: they resolve when a caller asks for the name.

    python -m tests.test_layering          # prints the table and every edge, by floor
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("clip_pl", "data_prep")
FACADE_HELPER = "clip_pl._lazy"  # the one module a package __init__ may import at module level

# (floor, module prefixes, why it sits there). A module takes the floor of its longest matching
# prefix; it may import modules of its own floor or below, never above, and never in a cycle.
LAYERS: list[tuple[int, tuple[str, ...], str]] = [
    (
        0,
        (
            "clip_pl._lazy",
            "clip_pl.distributed",
            "clip_pl.model",
            "clip_pl.pixels",
            "clip_pl.loss",
            "clip_pl.schedule",
            "clip_pl.towers",
        ),
        "foundations: towers, tokenizer, transforms, losses, LR schedules, rank/world size; plain torch and "
        "open_clip, no Lightning, no files",
    ),
    (
        1,
        (
            "clip_pl.interchange",
            "clip_pl.hf_export",
            "clip_pl.config_dir",
            "clip_pl.cli_args",
            "clip_pl.data.shardspec",
            "clip_pl.data.tarstream",
            "clip_pl.data.reader",
            "clip_pl.data.decode",
            "clip_pl.data.jpeg",
            "clip_pl.data.batch_transform",
            "clip_pl.data.batch_rows",
            "clip_pl.data.device_decode",
            "clip_pl.data.device_resize",
            "clip_pl.data.accounting",
            "clip_pl.data.keys",
            "clip_pl.data.workers",
            "clip_pl.eval.labels",
            "clip_pl.eval.report",
            "clip_pl.eval.common",
            "clip_pl.eval.distributed",
        ),
        "formats and primitives: every file format (checkpoints, transformers directories, the packaged "
        "configs, shard specs and their brace patterns on the command line, tars, samples, key files, class "
        "lists, reports) and the small pieces the engines share; built on the foundations only",
    ),
    (
        2,
        (
            "clip_pl.module",
            "clip_pl.strategies",
            "clip_pl.checkpointing",
            "clip_pl.csv_metrics",
            "clip_pl.inference",
            "clip_pl.data.stream",
            "clip_pl.data.datamodule",
            "clip_pl.data.synthetic",
            "clip_pl.data.forkserver_preload",
            "clip_pl.eval.datasets",
            "clip_pl.eval.zeroshot",
            "clip_pl.eval.retrieval",
            "clip_pl.eval.tasks",
            "clip_pl.eval.linear_probe",
            "clip_pl.eval.suite",
        ),
        "engines: the LightningModule, strategies, atomic checkpoint files and the resume choice, the CSV "
        "logger, the data pipelines (training and evaluation), the evaluators, inference; each usable alone, "
        "none knows the training loop's callbacks",
    ),
    (
        3,
        ("clip_pl.callbacks",),
        "callbacks: everything that watches or steers the Lightning loop (checkpoints, preemption, "
        "telemetry, progress, heatmap, CSV continuity, key recording, evaluation); may use any engine",
    ),
    (
        4,
        ("clip_pl.config_checks", "clip_pl.assembly"),
        "assembly: a Hydra config checked, then turned into data, module, callbacks and trainer",
    ),
    (
        5,
        (
            "clip_pl.train",
            "clip_pl.eval.__main__",
            "clip_pl.eval.demo_tasks",
            "clip_pl.demo",
            "clip_pl.plots",
            "clip_pl.data.audit",
            "clip_pl.data.plan",
        ),
        "entry points: command lines (python -m …); nothing imports them but each other",
    ),
    # data_prep never imports clip_pl (and clip_pl never imports data_prep: the demo runs it as a command).
    (
        10,
        (
            "data_prep.captions",
            "data_prep.failures",
            "data_prep.tables",
            "data_prep.shards",
            "data_prep.demo.digits",
            "data_prep.demo.server",
            "data_prep.curate.chunks",
            "data_prep.curate.shardio",
        ),
        "data_prep primitives: caption hygiene, failure reasons, input tables (whole or in chunks), img2dataset's "
        "output, the digits and the fault-injecting server",
    ),
    (
        11,
        ("data_prep.stats", "data_prep.download", "data_prep.curate.balance", "data_prep.curate.score"),
        "data_prep engines: url table → shards + manifests (img2dataset); table → balanced table, shards → CLIP scores",
    ),
    (
        12,
        ("data_prep.curate.cut", "data_prep.curate.dedup"),
        "data_prep curation over scores: CLIP-score cuts and near-duplicate removal, reading what score wrote",
    ),
    (12, ("data_prep.demo.build",), "the demo corpus, built with the real download"),
    (13, ("data_prep.demo.__main__", "data_prep.benchmark", "data_prep.curate.__main__"), "data_prep entry points"),
]


def project_modules(root: Path = REPO) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def facade_exports(package: str, modules: dict[str, Path]) -> dict[str, str]:
    """{name: module} of a package's ``lazy_exports(__name__, {submodule: [names]})`` table."""
    found = {}
    for node in ast.walk(ast.parse(modules[package].read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
            table = ast.literal_eval(node.args[1])
            found.update({n: f"{package}.{module}" for module, names in table.items() for n in names})
    return found


def imports_of(name: str, modules: dict[str, Path], module_level_only: bool = False) -> set[str]:
    """Project modules that module ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``, and
    ``from pkg import Name`` as the submodule that a facade ``pkg`` takes ``Name`` from)."""
    tree = ast.parse(modules[name].read_text(), filename=str(modules[name]))
    package = name if is_package(name, modules) else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            exports = facade_exports(base, modules) if base in modules and is_package(base, modules) else {}
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else exports.get(alias.name, base)
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in (_resolve(target, modules) for target in targets) if t)
    found.discard(name)
    return found


def floor_of(name: str) -> int | None:
    best: tuple[int, int] | None = None
    for floor, prefixes, _ in LAYERS:
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), floor)
    return None if best is None else best[1]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges of the non-facade modules (package ``__init__`` re-exports are left out, see the docstring)."""
    return {
        name: {t for t in imports_of(name, modules) if not is_package(t, modules)}
        for name in modules
        if not is_package(name, modules)
    }


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if floor_of(a) is not None and floor_of(b) is not None and floor_of(b) > floor_of(a)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


MODULES = project_modules()
GRAPH = import_graph(MODULES)


def test_every_module_has_a_floor():
    unplaced = sorted(name for name in MODULES if not is_package(name, MODULES) and floor_of(name) is None)
    assert not unplaced, f"add these modules to LAYERS in tests/test_layering.py: {unplaced}"


def test_no_module_imports_one_above_it():
    assert not upward_edges(GRAPH), "\n".join(upward_edges(GRAPH))


def test_the_import_graph_has_no_cycle():
    assert not cycles(GRAPH), cycles(GRAPH)


def test_package_inits_are_facades():
    eager = {
        name: sorted(imports_of(name, MODULES, module_level_only=True) - {FACADE_HELPER})
        for name in MODULES
        if is_package(name, MODULES)
    }
    eager = {name: targets for name, targets in eager.items() if targets}
    assert not eager, (
        f"package __init__ files import project modules at module level: {eager}; import them "
        f"inside __getattr__ (see clip_pl/eval/__init__.py), so a submodule import stays cheap"
    )


def test_data_prep_and_clip_pl_stay_apart():
    crossing = [
        f"{a} imports {b}" for a, targets in GRAPH.items() for b in targets if a.split(".")[0] != b.split(".")[0]
    ]
    assert not crossing, crossing


@pytest.mark.parametrize(
    "bad_edge", [("clip_pl.model", "clip_pl.module"), ("clip_pl.data.reader", "clip_pl.data.stream")]
)
def test_the_checks_see_an_upward_import(bad_edge):
    # The checks themselves, on a copy of the graph with one import added where it must not be.
    source, target = bad_edge
    graph = {name: set(targets) for name, targets in GRAPH.items()}
    graph[source].add(target)
    assert upward_edges(graph) and cycles(graph)


def test_the_parser_reads_relative_and_lazy_imports(tmp_path):
    package = tmp_path / "clip_pl"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("import json\n\ndef __getattr__(name):\n    from clip_pl.top import x\n")
    (package / "base.py").write_text("")
    (package / "top.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text("from .. import base\n\ndef f():\n    from ..top import y\n")
    (package / "facade").mkdir()
    (package / "facade" / "__init__.py").write_text(
        "__getattr__, __all__ = lazy_exports(__name__, {'deep': ['Thing']})\n"
    )
    (package / "facade" / "deep.py").write_text("")
    (package / "user.py").write_text("from clip_pl.facade import Thing\n")
    (tmp_path / "data_prep").mkdir()
    modules = project_modules(tmp_path)
    assert imports_of("clip_pl.sub.leaf", modules) == {"clip_pl.base", "clip_pl.top"}
    assert imports_of("clip_pl", modules, module_level_only=True) == set()
    assert imports_of("clip_pl.user", modules) == {"clip_pl.facade.deep"}  # through the facade, to its source


if __name__ == "__main__":
    for floor, prefixes, why in LAYERS:
        print(f"{floor:>2}  {', '.join(prefixes)}\n    {why}")
    for name in sorted(GRAPH, key=lambda n: (floor_of(n) or 0, n)):
        print(f"[{floor_of(name)}] {name} -> {', '.join(sorted(GRAPH[name])) or '-'}")
    sys.exit(0)
