"""Documented command lines through a real shell, then through the real entry point, cheaply.

Each line runs in ``bash -c``, so the entry point gets the words a user's shell gives it (quotes taken
off, braces left to us). The launchers in the line are shell functions that record those words:
``python`` (``python -m clip_pl.train …``), ``clip-pl-train``, ``clip-pl-eval``, ``torchrun … -m …`` and
``sbatch … slurm/train_*.sh …`` (launch.sh hands its ``"$@"`` to ``python -m clip_pl.train`` as it is;
tests/slurm/test_preemption_realistic.py runs that part for real). :func:`replay` then calls the entry
point's ``main()`` with every recorded command line, each in a child forked from one interpreter that
imported the entry points once: one start of ``python -m clip_pl.train`` costs seconds (Lightning's
import), a fork milliseconds. ``main()`` sees ``sys.argv`` as ``python -m`` would have set it.

    python -m tests.support.entry_points IN.json OUT.json   # IN: [[module, args…], …]
                                                            # OUT: [{returncode, stdout, stderr}, …]
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

ENTRY_POINTS = {"clip_pl.train": "clip_pl.train", "clip_pl.eval": "clip_pl.eval.__main__"}

SHELL_PRELUDE = r"""
record() { printf '%s\0' "$@" > "$ARGV_FILE"; }
python() { record "$@"; }
python3() { record "$@"; }
clip-pl-train() { record -m clip_pl.train "$@"; }
clip-pl-eval() { record -m clip_pl.eval "$@"; }
torchrun() { while [[ $# -gt 0 && $1 != -m ]]; do shift; done; record "$@"; }
sbatch() { while [[ $# -gt 0 && $1 != *.sh ]]; do shift; done; shift; record -m clip_pl.train "$@"; }
"""


def shell_words(line: str, argv_file: Path) -> tuple[list[str] | None, str]:
    """The arguments the shell hands the launcher in ``line`` (``['-m', 'clip_pl.train', …]``), or None
    and the shell's complaint when the line starts none."""
    argv_file.unlink(missing_ok=True)
    env = {**os.environ, "ARGV_FILE": str(argv_file)}
    done = subprocess.run(
        ["bash", "-c", f"{SHELL_PRELUDE}\n{line}"], env=env, capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0 or not argv_file.exists():
        return None, f"bash exited {done.returncode}: {done.stderr.strip()}"
    return argv_file.read_text().split("\0")[:-1], ""


def _start(module: str, args: list[str], out: Path) -> int:
    """Fork a child that runs ``module``'s main() as ``python -m module args…`` would; its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(out.with_suffix(f".{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [importlib.util.find_spec(ENTRY_POINTS[module]).origin, *args]
        importlib.import_module(ENTRY_POINTS[module]).main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_all(commands: list[list[str]], out_dir: Path, parallel: int) -> list[dict]:
    """Every ``[module, args…]`` in a child of its own, ``parallel`` at a time."""
    running: dict[int, int] = {}  # pid -> index
    codes: dict[int, int] = {}
    pending = list(enumerate(commands))
    while pending or running:
        while pending and len(running) < parallel:
            index, (module, *args) = pending.pop(0)
            running[_start(module, args, out_dir / f"line{index}")] = index
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return [
        {
            "returncode": codes[index],
            "stdout": (out_dir / f"line{index}.stdout").read_text(errors="replace"),
            "stderr": (out_dir / f"line{index}.stderr").read_text(errors="replace"),
        }
        for index in range(len(commands))
    ]


def replay(commands: list[list[str]], work_dir: Path, timeout: float = 300) -> list[dict]:
    """Run ``[module, args…]`` command lines through the entry points' ``main()`` in one fresh
    interpreter (a child per line); return each one's exit status and output."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "in.json").write_text(json.dumps(commands))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK")}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.entry_points", str(work_dir / "in.json"), str(work_dir / "out.json")],
        cwd=work_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the entry point runner failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads((work_dir / "out.json").read_text())


def main(argv: list[str]) -> None:
    commands = json.loads(Path(argv[0]).read_text())
    for module in {c[0] for c in commands}:
        importlib.import_module(ENTRY_POINTS[module])  # once, before the forks
    results = _run_all(commands, Path(argv[1]).parent, parallel=max(1, min(4, os.cpu_count() or 1)))
    Path(argv[1]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
