"""Class names and prompt templates for zero-shot classification: built-ins, files, lists.

Built-ins come from open_clip (nothing retyped): ``imagenet`` = the 1 000 ImageNet-1k class names
in the standard (sorted synset) order; ``openai_imagenet`` = OpenAI's 80 prompt templates,
``simple_imagenet`` = their 7-template subset. A file holds one entry per line (line k is class k);
a template contains ``{}`` where the class name goes. User-given lists must not repeat an entry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from open_clip import zero_shot_metadata

BUILTIN_CLASSNAMES = {"imagenet": zero_shot_metadata.IMAGENET_CLASSNAMES}
BUILTIN_TEMPLATES = {
    "openai_imagenet": zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES,
    "simple_imagenet": zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES,
}
_PROBE = "\x00"  # open_clip's templates are lambdas: render them once to get "{}" strings


def check_unique(names: Sequence[str], what: str) -> list[str]:
    names = list(names)
    if not names:
        raise ValueError(f"{what}: the list is empty.")
    duplicates = {name: count for name, count in Counter(names).items() if count > 1}
    if duplicates:
        where = {name: [i for i, n in enumerate(names) if n == name] for name in duplicates}
        raise ValueError(
            f"{what}: duplicated entries (name: positions) {where}; each class needs a distinct "
            f"name or its prompts are indistinguishable — rename or remove them."
        )
    return names


def check_templates(templates: Sequence[str], what: str = "templates") -> list[str]:
    templates = check_unique(templates, what)
    for i, template in enumerate(templates):
        if template.count("{}") != 1:
            raise ValueError(
                f"{what}: entry {i} {template!r} must contain exactly one '{{}}' where the class "
                f"name goes, e.g. 'a photo of a {{}}.'"
            )
    return templates


def _read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist.")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(
            f"{what} file {str(path)!r}: blank line(s) {blank} would shift the class indices; "
            f"remove them (line k names class k)."
        )
    return [line.strip() for line in lines]


def load_classnames(spec: str | Sequence[str]) -> list[str]:
    """``"imagenet"``, a path to a text file (one class per line), or a list of names."""
    if isinstance(spec, str) and spec in BUILTIN_CLASSNAMES:
        # Kept verbatim although OpenAI's ImageNet list names two class pairs alike ("missile",
        # "sunglasses"): published zero-shot numbers use exactly this list.
        return list(BUILTIN_CLASSNAMES[spec])
    if isinstance(spec, str):
        return check_unique(_read_lines(spec, "classnames"), f"classnames {spec!r}")
    return check_unique([str(n) for n in spec], "classnames")


def load_templates(spec: str | Sequence[str]) -> list[str]:
    """``"openai_imagenet"``, ``"simple_imagenet"``, a path (one template per line), or a list."""
    if isinstance(spec, str) and spec in BUILTIN_TEMPLATES:
        rendered = [t(_PROBE) for t in BUILTIN_TEMPLATES[spec]]
        return check_templates([t.replace(_PROBE, "{}") for t in rendered], f"templates {spec!r}")
    if isinstance(spec, str):
        return check_templates(_read_lines(spec, "templates"), f"templates {spec!r}")
    return check_templates([str(t) for t in spec])
