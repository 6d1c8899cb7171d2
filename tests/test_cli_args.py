"""Brace patterns typed as the README types them reach Hydra as strings (clip_pl/cli_args.py), and
nothing else on the command line changes.

    pytest tests/test_cli_args.py        # the table in-process; the entry points in a real shell (~10 s)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from clip_pl.cli_args import quote_brace_patterns

REPO = Path(__file__).resolve().parents[1]

# (argument as the shell hands it over, what Hydra gets)
REWRITTEN = [
    ("data.train_shards=/data/cc3m/{00000..00331}.tar", "data.train_shards='/data/cc3m/{00000..00331}.tar'"),
    ("paths.retrieval_shards=/data/coco5k/{0000..0004}.tar", "paths.retrieval_shards='/data/coco5k/{0000..0004}.tar'"),
    ("data.train_shards={00000..00003}.tar", "data.train_shards='{00000..00003}.tar'"),  # relative, braces first
    ("data.train_shards=/d/{000..100..10}.tar", "data.train_shards='/d/{000..100..10}.tar'"),  # with a step
    ("data.train_shards=/d/{cc3m,cc12m}/{00..09}.tar", "data.train_shards='/d/{cc3m,cc12m}/{00..09}.tar'"),
    ("data.train_shards=/a/{0..9}.tar::/b/{00..99}.tar", "data.train_shards='/a/{0..9}.tar::/b/{00..99}.tar'"),
    ("data.train_shards=/d/shard-[0-4].tar", "data.train_shards='/d/shard-[0-4].tar'"),  # a glob class
    (
        "data.train_shards=pipe:aws s3 cp s3://b/laion/{00000..41455}.tar -",
        "data.train_shards='pipe:aws s3 cp s3://b/laion/{00000..41455}.tar -'",
    ),
    (
        "data.train_shards=pipe:curl -s 'https://h/{0..9}.tar?sig=x'",  # a ' inside: Hydra's other quote
        "data.train_shards=\"pipe:curl -s 'https://h/{0..9}.tar?sig=x'\"",
    ),
    ("+eval.callbacks.coco.data=/c/{0..4}.tar", "+eval.callbacks.coco.data='/c/{0..4}.tar'"),
    ("++data.val_shards=/v/{0..1}.tar", "++data.val_shards='/v/{0..1}.tar'"),
    ("data.train_shards= /d/{0..1}.tar ", "data.train_shards='/d/{0..1}.tar'"),  # the ends Hydra trims
]

UNTOUCHED = [
    "data.train_shards='/data/cc3m/{00000..00331}.tar'",  # already quoted for Hydra
    'data.train_shards="/data/cc3m/{00000..00331}.tar"',
    "data.train_shards=/data/cc3m",  # a folder
    "data.train_shards=/data/cc3m/*.tar",  # a glob Hydra takes as it is
    "data.train_shards=pipe:aws s3 cp s3://b/x.tar -",  # spaces alone: Hydra keeps them
    "data.train_shards=/a::/b",
    "data.train_weights=3::1",
    "trainer.devices=8",
    "experiment=cc3m_rn50",
    "hydra/launcher=submitit_slurm",
    "hydra.job_logging.root.handlers=[console]",  # a list
    "data.train_shards=[/a/{0..1}.tar,/b]",  # a list (Hydra's error, as typed)
    "+x={a: 1, b: 2}",  # a dict
    "+x={}",
    "optim.lr=5e-4,1e-3",  # a sweep
    "data.train_shards=/a/{0..1}.tar,/b/{0..1}.tar",  # a sweep of patterns: Hydra's error, as typed
    "paths.run_dir=${paths.root_dir}/runs/x",  # an interpolation
    "data.train_shards=${oc.env:SHARDS}/{0..1}.tar",  # an interpolation with a pattern: as typed
    "data.train_shards=/d/\\{0..1\\}.tar",  # Hydra's escapes
    "data.train_shards=pipe:x 'a' \"{0..1}\"",  # both quotes
    "~callbacks.ema",
    "-m",
    "--multirun",
    "--cfg",
    "job",
    "--resolve",
    "--config-dir=/etc/{a,b}",  # an option
    "/data/{0..1}.tar",  # not an override
    "",
]


@pytest.mark.parametrize("typed, hydra_gets", REWRITTEN)
def test_brace_patterns_get_hydra_quotes_and_parse_as_the_string_typed(typed, hydra_gets):
    (rewritten,) = quote_brace_patterns([typed])
    assert rewritten == hydra_gets
    assert quote_brace_patterns([rewritten]) == [rewritten]  # idempotent: Lightning's DDP relaunch passes argv on
    (override,) = OverridesParser.create().parse_overrides([rewritten])
    assert override.value() == typed.partition("=")[2].strip()


@pytest.mark.parametrize("arg", UNTOUCHED)
def test_everything_else_reaches_hydra_as_typed(arg):
    assert quote_brace_patterns([arg]) == [arg]


def test_a_whole_command_line_and_the_values_of_options():
    argv = [
        "-m",
        "experiment=cc3m_rn50",
        "data.train_shards=/d/{0..1}.tar",
        "optim.lr=1e-4,3e-4",
        "--config-name",
        "x={0..1}",  # an option's value, not an override
        "--cfg",
        "job",
    ]
    assert quote_brace_patterns(argv) == [*argv[:2], "data.train_shards='/d/{0..1}.tar'", *argv[3:]]


def _shell(line: str) -> subprocess.Popen:
    """``line`` started by bash as a user types it, with this interpreter's directory first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(["bash", "-c", line], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_the_entry_points_apply_it_to_the_readme_commands_in_a_real_shell():
    # The README's and docs/evaluation.md's lines, exactly as typed: bash removes the single quotes.
    lines = {
        "train_shards: /data/cc3m/{00000..00331}.tar": "python -m clip_pl.train experiment=cc3m_rn50 "
        "data.train_shards='/data/cc3m/{00000..00331}.tar' --cfg job",
        "retrieval_shards: /data/coco5k/{0000..0004}.tar": "python -m clip_pl.eval checkpoint=last.ckpt "
        "eval=retrieval paths.retrieval_shards='/data/coco5k/{0000..0004}.tar' --cfg job",
    }
    started = {expected: _shell(line) for expected, line in lines.items()}  # both at once: two interpreter starts
    for expected, process in started.items():
        stdout, stderr = (stream.decode() for stream in process.communicate(timeout=300))
        assert process.returncode == 0, f"{lines[expected]}\n{stderr[-3000:]}"
        assert expected in stdout, lines[expected]
