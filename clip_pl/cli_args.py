"""Brace patterns on the command line, as the shell hands them over, quoted for Hydra.

A shard spec such as ``/data/cc3m/{00000..00331}.tar`` is quoted for the shell (otherwise bash expands
the braces itself), and the shell takes those quotes off: the entry point receives
``data.train_shards=/data/cc3m/{00000..00331}.tar``, and Hydra's override grammar reads the ``{`` as
the start of a dict and refuses the whole command line (``mismatched input '{' expecting <EOF>``),
after a SLURM job waited in the queue. Typing two layers of quotes
(``"data.train_shards='/data/cc3m/{00000..00331}.tar'"``) works, but nobody does. So every Hydra
entry point that takes shard specs (``clip_pl.train``, ``clip_pl.eval``) passes its arguments through
:func:`quote_brace_patterns` before Hydra parses them, and that puts Hydra's quotes around such a value.

Narrow on purpose. An argument is rewritten only when all of these hold:

* it is an override ``key=value`` (also ``+key=``, ``++key=``, ``~key=``), not an option such as
  ``--cfg`` or the value an option takes;
* its value contains a brace-expansion group as webdataset's ``braceexpand`` reads it: a range
  ``{00000..00331}`` (``{0..9..2}``, ``{a..f}``) or a list of words ``{cc3m,cc12m}``; or a glob bracket
  class such as ``shard-[0-4].tar`` after the first character;
* nothing else in it is Hydra syntax that the quotes would change: no ``${`` (an interpolation), no
  backslash, no ``,`` outside the brace groups (a sweep ``a,b``, or a list), not both kinds of quote;
* Hydra's grammar refuses it as it stands. An override Hydra parses is never changed, so values already
  quoted (``'…'``, ``"…"``), lists ``[…]``, dicts ``{a: 1}``, sweeps and ``key=value`` for every other key
  reach Hydra exactly as typed.

The quote used is ``'`` (``"`` when the value holds a ``'``, e.g. a ``pipe:`` command with quoted
words). A ``pipe:`` command with spaces needs nothing on its own: Hydra keeps inner whitespace of an
unquoted value. Any other character Hydra's grammar reserves (``=``, ``(``, ``,`` …) in a value with no
brace group still needs Hydra's quotes typed inside the shell's: ``"data.train_shards='pipe:…'"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

# Hydra's key grammar, loosely: group/package paths, dotted keys, `@package`; with +, ++ or ~ in front.
_OVERRIDE = re.compile(r"(?P<key>(?:\+\+|\+|~)?[\w$][\w$./-]*(?:@[\w$.-]*)?)=(?P<value>.*)", re.S)
# braceexpand's groups: a range a..b (a step ..n) or a list of words; never a dict (no ':' inside).
_BRACE_GROUP = re.compile(r"(?<!\$)\{(?:[\w.-]+\.\.[\w.-]+|[\w./-]*(?:,[\w./-]*)+)\}")
_BRACKET_CLASS = re.compile(r"(?<=.)\[[^\[\],]+\]", re.S)  # a glob class past the first character
# Hydra's options that take the next argument as their value (its argparse setup, hydra/_internal/utils.py).
_OPTIONS_WITH_VALUE = frozenset(
    {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir"}
    | {"-i", "--info", "--experimental-rerun"}
)


@lru_cache(maxsize=1)
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _hydra_accepts(override: str) -> bool:
    from hydra.errors import HydraException

    try:
        _parser().parse_overrides([override])
    except HydraException:  # OverrideParseException: the grammar refused it
        return False
    return True


def _needs_quotes(value: str) -> bool:
    if not (_BRACE_GROUP.search(value) or _BRACKET_CLASS.search(value)):
        return False
    if "${" in value or "\\" in value or ("'" in value and '"' in value):
        return False
    return "," not in _BRACE_GROUP.sub("", value)  # a comma outside the groups: a sweep or a list


def quote_brace_patterns(args: Sequence[str]) -> list[str]:
    """The command line ``args`` (``sys.argv[1:]``) with every brace pattern Hydra would refuse put in
    Hydra quotes; every other argument unchanged. Idempotent."""
    out = list(args)
    for index, arg in enumerate(out):
        if index and args[index - 1] in _OPTIONS_WITH_VALUE:
            continue
        match = _OVERRIDE.fullmatch(arg)
        if not match or not _needs_quotes(match["value"]) or _hydra_accepts(arg):
            continue
        value = match["value"].strip(" \t")  # the ends Hydra would trim off an unquoted value
        quote = '"' if "'" in value else "'"
        out[index] = f"{match['key']}={quote}{value}{quote}"
    return out
