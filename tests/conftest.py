"""What every test shares. Helpers that tests import live in ``tests/support/`` (gloo process groups,
fake shards, tiny towers, composed configs, evaluation fixtures); the folders mirror the package
(``tests/data`` ↔ ``clip_pl/data``, ``tests/eval``, ``tests/callbacks``, ``tests/data_prep``,
``tests/slurm`` for the real loopback cluster)."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Nothing may be downloaded at run time: the Hugging Face libraries (transformers, open_clip's
    # hub calls) fail at once instead of trying the network. Set before any test imports them, and
    # inherited by every subprocess a test starts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # One intra-op thread per test process: `make test` runs three workers on two cores, and many tests
    # start more processes (gloo ranks, SLURM tasks, CLIs); two threads each oversubscribe the cores,
    # and the tiny models gain nothing from a second thread (measured: the suite ~10 % faster).
    # torch reads it when first imported, which is after this.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    emulate_forced_cpu_capability(os.environ)


# oneDNN's own instruction-set ceiling that matches each ATEN_CPU_CAPABILITY a user can force.
_ONEDNN_ISA_FOR_CAPABILITY = {"default": "SSE41", "avx2": "AVX2"}


def emulate_forced_cpu_capability(env) -> None:
    """`ATEN_CPU_CAPABILITY=avx2 make test` (the numerics pass in .ci/run) stands in for a CPU that has
    no more than AVX2. The variable alone does not make one on an AVX-512/AMX CPU; two things still see
    the real CPU (measured on torch 2.14, Sapphire Rapids):

    - oneDNN: it reports AMX, so bf16 attention packs its operands for AMX, and the AVX2 build of the
      kernel refuses (`pack_vnni2 is only supported when avx512 is supported`). ONEDNN_MAX_CPU_ISA caps
      oneDNN where the forced capability is, as a real AVX2 CPU would be;
    - inductor's on-disk cache (torch.compile): its key leaves the capability out, so code generated for
      AVX-512 (16 lanes) is reused under AVX2 (8 lanes): NaN losses; under `default`, a C++ compile error.
      Each capability gets its own cache folder.

    Both are set only when a capability is forced, and only where the user has not set them."""
    capability = env.get("ATEN_CPU_CAPABILITY", "").lower()
    if not capability:
        return
    if capability in _ONEDNN_ISA_FOR_CAPABILITY:
        env.setdefault("ONEDNN_MAX_CPU_ISA", _ONEDNN_ISA_FOR_CAPABILITY[capability])
    import getpass
    import tempfile

    env.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{capability}"),
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The longest groups first, so that under xdist the workers finish together instead of one
    # waiting on the other's last long file (the scheduler hands out groups in collection order).
    items.sort(key=lambda item: _LONG_GROUPS_FIRST.get(shared_fixture_group(item.nodeid), len(_LONG_GROUPS_FIRST)))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs three pytest-xdist workers (`-n 3 --dist loadscope`). Tests that share a fixture
    built once run in one worker: a file's tests (its module-scoped fixtures: the strategy matrix,
    trained checkpoints, shard sets), every test of the loopback SLURM cluster (one cluster), and the
    files that ask for the session's digits CLIP. xdist's own `xdist_group` mark cannot do this under
    pytest 9.2 (xdist 3.8 renames `item._nodeid`, which pytest no longer reads), so the scheduler is
    told the groups by node id."""
    if config.getvalue("dist") != "loadscope":
        return None  # another --dist asked for on the command line: xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_fixture_group(nodeid)

    return SharedFixtureScheduling(config, log)


# Files whose tests share a session fixture across files, by path prefix.
_SHARED_ACROSS_FILES = {
    "tests/slurm/": "slurm",  # the loopback SLURM cluster
    "tests/data_prep/test_score.py": "digits_clip",  # tests/data_prep/conftest.py's trained CLIP
    "tests/data_prep/test_dedup.py": "digits_clip",
}


def shared_fixture_group(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return next((group for prefix, group in _SHARED_ACROSS_FILES.items() if path.startswith(prefix)), path)


# Groups that take minutes on 2 cores, longest first (from `--durations`); the rest keep their order.
_LONG_GROUPS_FIRST = {
    name: rank
    for rank, name in enumerate(
        [
            "slurm",
            "tests/test_strategies.py",
            "tests/test_demo.py",
            "tests/test_resume_matrix.py",
            "digits_clip",
        ]
    )
}
