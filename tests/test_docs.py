"""The README and docs/ stay true: every command they show works as typed in a shell and passes the config
checks, every override and config key they name exists, every file they point to is there, and the tables
that mirror the configs match them.

    pytest tests/test_docs.py        # ~30 s: every documented command through bash and `--cfg job`; trains nothing

A documented command goes through bash as a user types it (bash takes the quotes off
``data.train_shards='/data/{00000..00331}.tar'``; nothing here puts them back), then through the entry
point's ``main()`` with ``--cfg job``: tests/support/entry_points.py.

Defaults are not restated in the docs (``--cfg job`` prints them); what the docs do restate is checked here.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from clip_pl.cli_args import quote_brace_patterns
from clip_pl.config_checks import prepare_config
from clip_pl.config_dir import config_dir
from tests.support.entry_points import ENTRY_POINTS, replay, shell_words

REPO = Path(__file__).resolve().parents[1]
CONF = Path(config_dir())
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "slurm" / "README.md",
    REPO / "data_prep" / "README.md",
]
CONFIG_DOCS = [d for d in DOCS if d.parent.name != "data_prep"]  # data_prep's key=value are its own arguments
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
# Backticked words that look like config keys but are not: a Python attribute, generic examples.
NOT_CONFIG_KEYS = {"trainer.save_checkpoint", "group=choice", "experiment=mine"}
FILE_SUFFIXES = (
    ".py",
    ".sh",
    ".md",
    ".yaml",
    ".json",
    ".jsonl",
    ".ckpt",
    ".csv",
    ".txt",
    ".tar",
    ".png",
    ".log",
    ".safetensors",
)


def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def _choices(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_")}


def _compose(config: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config, overrides=overrides, return_hydra_config=hydra)


def _paths(node, prefix: str = "") -> set[str]:
    out = set()
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            out.add(path)
            out |= _paths(node._get_node(key), path + ".")
    return out


@lru_cache(maxsize=1)
def known_keys() -> frozenset[str]:
    """Every dotted key of the training config under every choice of every group, and the eval app's."""
    keys = _paths(_compose("train", []))
    for group in GROUPS:
        for choice in _choices(group):
            keys |= _paths(_compose("train", [f"{group}={choice}"]))
    keys |= _paths(_compose("eval_app", []))
    return frozenset(keys)


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[str]:
    """Shell lines of the fenced blocks, continuation lines joined."""
    lines = []
    for block in _fenced_blocks(text):
        lines += block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _entry_config(line: str) -> str | None:
    """The config a clip_pl.train / clip_pl.eval command line (or an sbatch of the training scripts)
    composes: "train" or "eval_app"; None for any other line."""
    for word in shlex.split(line.replace("…", "PLACEHOLDER"), comments=True):
        if word in ("clip_pl.train", "clip-pl-train") or word.endswith(
            ("slurm/train_256gpu.sh", "slurm/train_1node.sh")
        ):
            return "train"
        if word in ("clip_pl.eval", "clip-pl-eval"):
            return "eval_app"
    return None


def _fill_placeholders(line: str, tmp: Path) -> str:
    """The line as a user would type it with real values: `key=…` gets a path under ``tmp``, `<p>`
    inside a value becomes x; a group choice left open (`experiment=<name>`, `eval=…`: the default
    stands in), a bare `…` and `[hydra overrides…]` go. Nothing else changes: quotes stay for the shell."""
    groups = set(GROUPS) | {"hydra/launcher"}

    def fill(match: re.Match) -> str:
        key, eq, value = match.group().partition("=")
        if not eq or key in groups:
            return ""
        value = re.sub(r"<\w+>", "x", value.replace("…", str(tmp / "placeholder")))
        return f"{key}={shlex.quote(value)}"

    line = re.sub(r"\[[^\]]*…\]", "", line)
    return re.sub(r"(?<!\S)\S*(?:…|<\w+>)\S*", fill, line)


def _sweep_first_points(args: list[str]) -> list[str]:
    """A multirun line without `-m` and with each sweep `key=a,b` at its first point: Hydra refuses
    `--cfg` together with `--multirun`, and the first point stands for all."""
    if "-m" not in args and "--multirun" not in args:
        return args
    parser = OverridesParser.create()
    out = []
    for arg in args:
        if arg in ("-m", "--multirun"):
            continue
        if "=" in arg and not arg.startswith("-"):
            try:
                (override,) = parser.parse_overrides([quote_brace_patterns([arg])[0]])
            except HydraException:
                pass  # left for Hydra to refuse, with its message
            else:
                if override.is_sweep_override():
                    arg = f"{arg.partition('=')[0]}={next(override.sweep_string_iterator())}"
        out.append(arg)
    return out


@dataclass
class ShellRun:
    """A documented command line after the shell: the words it handed the entry point, and what
    `<line> --cfg job` did (the shell's complaint instead when it started nothing)."""

    doc: Path
    line: str
    config: str
    args: list[str] | None  # after `-m clip_pl.train`; `-m` and sweeps resolved, see _sweep_first_points
    shell_error: str = ""
    result: dict | None = None


def _documented_commands():
    for doc in DOCS:
        for line in _commands(doc.read_text()):
            config = _entry_config(line)
            if config:
                yield doc, line, config


@pytest.fixture(scope="module")
def shell_runs(tmp_path_factory) -> dict[Path, list[ShellRun]]:
    """Every documented command line run by bash, then by its entry point with `--cfg job` (all in one
    interpreter, a forked child each: tests/support/entry_points.py)."""
    tmp = tmp_path_factory.mktemp("docs_shell")
    runs: dict[Path, list[ShellRun]] = {doc: [] for doc in DOCS}
    replayed = []
    for doc, line, config in _documented_commands():
        words, error = shell_words(_fill_placeholders(line, tmp), tmp / "argv")
        run = ShellRun(doc, line, config, None, error)
        if words is not None:
            if words[:1] != ["-m"] or len(words) < 2 or words[1] not in ENTRY_POINTS:
                run.shell_error = f"the line starts {words[:2]}, not python -m clip_pl.train / clip_pl.eval"
            else:
                run.args = _sweep_first_points(words[2:])
                replayed.append((run, [words[1], f"paths.root_dir={tmp}", *run.args, "--cfg", "job"]))
        runs[doc].append(run)
    for (run, _), result in zip(replayed, replay([c for _, c in replayed], tmp / "replay")):
        run.result = result
    return runs


@pytest.mark.slow  # every documented command through bash and its entry point: > ~10 s (make test-quick leaves it out)
@pytest.mark.parametrize("doc", CONFIG_DOCS, ids=_ids(CONFIG_DOCS))
def test_every_documented_command_runs_as_typed_in_a_shell(doc, shell_runs):
    """What a user sees: the line, placeholders filled in, through bash (which takes the quotes off a
    brace pattern) and the entry point's main() with `--cfg job`, exit status 0."""
    failed = []
    for run in shell_runs[doc]:
        if run.result is None:
            failed.append(f"`{run.line}`: {run.shell_error}")
        elif run.result["returncode"] != 0:
            failed.append(f"`{run.line}` --cfg job exits {run.result['returncode']}:\n{run.result['stderr'][-1500:]}")
    assert not failed, f"{doc.relative_to(REPO)}:\n" + "\n\n".join(failed)


@pytest.mark.slow  # every documented command through bash and its entry point: > ~10 s (make test-quick leaves it out)
@pytest.mark.parametrize("doc", CONFIG_DOCS, ids=_ids(CONFIG_DOCS))
def test_every_documented_command_composes_and_passes_the_config_checks(doc, shell_runs, tmp_path, monkeypatch):
    """The checks `--cfg job` skips: the same words the shell produced, composed as the entry point
    does (brace patterns quoted for Hydra, clip_pl/cli_args.py) and put through prepare_config."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)  # the topology check reads SLURM's variables
    checked = 0
    for run in shell_runs[doc]:
        if run.args is None:
            continue  # test_every_documented_command_runs_as_typed_in_a_shell says why
        overrides = quote_brace_patterns([a for a in run.args if "=" in a and not a.startswith("-")])
        hydra = any(o.startswith("hydra") for o in overrides)
        try:
            cfg = _compose(run.config, [f"paths.root_dir={tmp_path}", *overrides], hydra=hydra)
            if run.config == "train":
                if hydra:
                    with open_dict(cfg):
                        del cfg["hydra"]
                prepare_config(cfg, check_paths=False)  # the paths are placeholders
        except Exception as error:  # noqa: BLE001 - the message names the line
            pytest.fail(f"{doc.relative_to(REPO)}: `{run.line}` does not compose: {type(error).__name__}: {error}")
        checked += 1
    if doc in (REPO / "README.md", REPO / "docs" / "configuration.md", REPO / "docs" / "evaluation.md"):
        assert checked, f"no clip_pl command found in {doc.name}: the parser is broken"


def _backticked(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def _backticked_words(doc: Path) -> list[str]:
    """Every whitespace-separated word inside backticks, outside Python calls such as
    `processor(text, padding="max_length")` (keywords there are not overrides)."""
    return [
        word.strip(",;:()")
        for token in _backticked(doc.read_text())
        if not re.match(r"[\w.]+\(", token)
        for word in token.split()
    ]


@pytest.mark.parametrize("doc", CONFIG_DOCS, ids=_ids(CONFIG_DOCS))
def test_every_override_and_key_named_in_prose_exists(doc):
    keys, top = known_keys(), {k for k in known_keys() if "." not in k}
    groups = set(GROUPS) | {"hydra/launcher"}
    missing = []
    for word in _backticked_words(doc):
        key, eq, value = word.partition("=")
        if (
            not re.fullmatch(r"[a-z_]+(/[a-z_]+)?(\.[A-Za-z_]\w*)*", key)
            or word in NOT_CONFIG_KEYS
            or key.endswith(FILE_SUFFIXES)
            or "<" in word
        ):
            continue
        head = key.split(".")[0]
        if eq and key in groups:
            group_dir = CONF / key
            if re.fullmatch(r"\w+", value) and value not in {p.stem for p in group_dir.glob("*.yaml")}:
                missing.append(word)
        elif "." in key and head in set(GROUPS) | top and head not in ("clip_pl", "torch", "open_clip"):
            if key not in keys:
                missing.append(word)
        elif eq and "." not in key and "/" not in key and key not in top and key not in groups:
            if re.fullmatch(r"[a-z_]+", key) and key.islower() and value and not value.startswith("-"):
                missing.append(word)
    assert not missing, (
        f"{doc.relative_to(REPO)} names config keys or choices that do not exist: {sorted(set(missing))}"
    )


_PATH = re.compile(r"(?:clip_pl|data_prep|slurm|tests|benchmarks|docs|\.ci)/[\w./-]*|[\w-]+\.(?:md|toml)|Makefile")


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_file_and_link_mentioned_exists(doc):
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            missing.append(target)
    for token in _backticked(text):
        for word in token.split():
            if _PATH.fullmatch(word) and not re.search(r"[<>*{}%]", word) and word != "DESIGN.md":
                if not (REPO / word).exists() and not (doc.parent / word).exists():
                    missing.append(word)
    assert not missing, f"{doc.relative_to(REPO)} points to files or anchors that do not exist: {sorted(set(missing))}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"(?m)^#+ (.*)$", markdown)
    }


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_clip_pl_name_mentioned_exists(doc):
    missing = []
    for word in _backticked_words(doc):
        if not re.fullmatch(r"clip_pl(\.\w+)+", word):
            continue
        parts = word.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attribute in parts[cut:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                missing.append(word)
            break
        else:
            missing.append(word)
    assert not missing, (
        f"{doc.relative_to(REPO)} names clip_pl modules or attributes that do not exist: {sorted(set(missing))}"
    )


def test_the_group_table_lists_exactly_the_choices_on_disk():
    text = (REPO / "docs" / "configuration.md").read_text()
    table = text[text.index("| group | choices |") :].split("\n\n")[0]
    rows = re.findall(r"(?m)^\| (`[a-z_]+`(?: / `[a-z_]+`)?) \| (.*) \|$", table)
    documented: dict[str, set[str]] = {}
    for groups, choices in rows:
        names = re.findall(r"`(\w+)`", groups)
        words = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", choices))
        if len(names) == 1:
            documented[names[0]] = set(words)
        else:  # "`a` / `b` | `x` / `y`, `z`": the first choice is a's, the rest b's
            first, rest = re.sub(r"\([^)]*\)", "", choices).split(" / ", 1)
            documented[names[0]] = set(re.findall(r"`(\w+)`", first))
            documented[names[1]] = set(re.findall(r"`(\w+)`", rest))
    on_disk = {g: _choices(g) for g in GROUPS}
    assert documented.keys() == on_disk.keys()
    for group, choices in on_disk.items():
        assert documented[group] == choices, f"docs/configuration.md, group {group}"


def _number(cell: str) -> int | None:
    match = re.match(r"[\d  ,]+", cell.strip())
    digits = re.sub(r"\D", "", match.group()) if match else ""
    return int(digits) if digits else None


def test_the_recipe_table_states_each_recipes_batch_and_steps():
    table = (REPO / "docs" / "configuration.md").read_text()
    rows = re.findall(r"(?m)^\| `(\w+)` \| ([^|]*) \| ([^|]*) \| ([^|]*) \| ([^|]*) \|$", table)
    recipes = {name: (batch, steps) for name, _, batch, steps, _ in rows if name in _choices("experiment")}
    assert recipes.keys() == _choices("experiment")
    for name, (batch, steps) in recipes.items():
        cfg = _compose("train", [f"experiment={name}", "data.train_shards=/placeholder"])
        assert _number(steps) == cfg.trainer.max_steps, name
        expected = cfg.global_batch_size or OmegaConf.select(cfg, "data.batch_size")
        if cfg.global_batch_size is None:
            assert "not set" in batch or _number(batch) == expected, name
        else:
            assert _number(batch) == expected, name


def test_the_strategy_table_has_one_row_per_strategy_choice():
    text = (REPO / "docs" / "strategies.md").read_text()
    table = text[text.index("| `strategy=` |") :].split("\n\n")[0]
    rows = re.findall(r"(?m)^\| `(\w+)`", table)
    assert sorted(rows) == sorted(_choices("strategy")), "docs/strategies.md"
