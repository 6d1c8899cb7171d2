"""The exactly-once audit (clip_pl/data/audit.py) on crafted key files, and the key recorder's trim.

    pytest tests/data/test_audit.py

Each case is a small run: 2 ranks × batch 2, 10 samples per epoch → 2 steps per epoch, 2 samples
of each epoch's order left out (the remainder).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from clip_pl.callbacks.keys import KeyRecorder
from clip_pl.data.audit import audit, main
from clip_pl.data.keys import read_lines

N = 10


def _write(run_dir, lines_by_rank):
    (run_dir / "keys").mkdir(parents=True, exist_ok=True)
    for rank, lines in lines_by_rank.items():
        with open(run_dir / "keys" / f"rank{rank}.jsonl", "w") as f:
            for step, epoch, keys, *bad in lines:
                f.write(json.dumps({"step": step, "epoch": epoch, "keys": keys, "bad": bad[0] if bad else {}}) + "\n")


def _clean_epoch(epoch, first_step, keys):
    """Rank 0 gets keys[0:2], keys[4:6]; rank 1 keys[2:4], keys[6:8] (any split works)."""
    return {
        0: [(first_step, epoch, keys[0:2]), (first_step + 1, epoch, keys[4:6])],
        1: [(first_step, epoch, keys[2:4]), (first_step + 1, epoch, keys[6:8])],
    }


KEYS = [f"{i:04d}" for i in range(N)]


def _merge(*runs):
    out: dict = {0: [], 1: []}
    for run in runs:
        for rank, lines in run.items():
            out[rank] += lines
    return out


def test_every_sample_once_with_the_remainder_left_out_passes(tmp_path):
    # epoch 0 leaves out 8, 9; epoch 1 (another order) leaves out 0, 1; epoch 2 is partial (run ended)
    _write(
        tmp_path,
        _merge(
            _clean_epoch(0, 1, KEYS),
            _clean_epoch(1, 3, KEYS[2:] + KEYS[:2]),
            {0: [(5, 2, KEYS[0:2])], 1: [(5, 2, KEYS[2:4])]},
        ),
    )
    report = audit(tmp_path, N)
    assert report["ok"], report
    assert [e["missing"] for e in report["epochs"]] == [2, 2, None]
    assert report["steps_per_epoch"] == 2 and report["remainder_per_epoch"] == 2
    assert main([str(tmp_path), "--epoch-samples", str(N)]) == 0


def test_a_duplicate_fails(tmp_path):
    keys = KEYS[:7] + [KEYS[0]]  # sample 0000 twice, 0007 never
    _write(tmp_path, _clean_epoch(0, 1, keys))
    report = audit(tmp_path, N)
    assert not report["ok"] and "1 duplicates" in report["epochs"][0]["problems"][0]
    assert main([str(tmp_path), "--epoch-samples", str(N)]) == 1


def test_a_replayed_batch_fails_as_a_duplicate_and_a_missing_sample(tmp_path):
    # rank 1 trained its step-1 batch again at step 2 (a resume that did not advance the loader)
    _write(tmp_path, {0: [(1, 0, KEYS[0:2]), (2, 0, KEYS[4:6])], 1: [(1, 0, KEYS[2:4]), (2, 0, KEYS[2:4])]})
    report = audit(tmp_path, N)
    assert not report["ok"]
    problems = report["epochs"][0]["problems"]
    assert any("2 duplicates" in p for p in problems) and any("4 samples never trained" in p for p in problems)


def test_lost_steps_before_the_next_epoch_fail(tmp_path):
    run = _merge(_clean_epoch(0, 1, KEYS), _clean_epoch(1, 3, KEYS))
    run[1] = [line for line in run[1] if line[0] != 2]  # rank 1's step 2 never recorded
    _write(tmp_path, run)
    report = audit(tmp_path, N)
    assert not report["ok"] and "steps were lost" in report["epochs"][0]["problems"][0]


def test_a_step_recorded_twice_fails(tmp_path):
    run = _clean_epoch(0, 1, KEYS)
    run[0].append((2, 0, KEYS[4:6]))  # a restart that replayed step 2 without trimming
    _write(tmp_path, run)
    report = audit(tmp_path, N)
    assert not report["ok"] and any("recorded twice" in p for p in report["epochs"][0]["problems"])


def test_bad_samples_and_their_refills_are_explained(tmp_path):
    # sample 0003 was corrupt: skipped, and its place refilled with 0002 (a duplicate)
    bad = {"skipped/corrupt_image": 1, "refilled": 1}
    run = {0: [(1, 0, KEYS[0:2]), (2, 0, KEYS[4:6])], 1: [(1, 0, [KEYS[2], KEYS[2]], bad), (2, 0, KEYS[6:8])]}
    _write(tmp_path, run)
    report = audit(tmp_path, N)
    assert report["ok"], report
    e = report["epochs"][0]
    assert (e["duplicates"], e["missing"], e["skipped"], e["refilled"]) == (1, 3, 1, 1)
    run[1][0] = (1, 0, [KEYS[2], KEYS[2]])  # the same without the loader's counts: unexplained
    _write(tmp_path, run)
    assert not audit(tmp_path, N)["ok"]


def test_sizes_json_gives_the_epoch_size(tmp_path):
    _write(tmp_path, _clean_epoch(0, 1, KEYS))
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": 4}))
    assert main([str(tmp_path), "--sizes", str(tmp_path / "sizes.json"), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["epoch_samples"], report["steps_per_epoch"], report["remainder_per_epoch"]) == (10, 2, 2)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": 6}))  # 12: 3 steps per epoch
    assert main([str(tmp_path), "--sizes", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["epochs"][0]["complete"] is False  # the run ended in it


def test_the_recorder_drops_steps_a_restart_rolled_back(tmp_path):
    recorder = KeyRecorder(str(tmp_path / "keys"))
    trainer = SimpleNamespace(
        global_rank=1,
        global_step=0,
        fit_loop=SimpleNamespace(epoch_progress=SimpleNamespace(current=SimpleNamespace(processed=0))),
    )
    recorder.on_train_start(trainer, None)
    for step in range(1, 6):
        trainer.global_step = step
        recorder.on_train_batch_end(trainer, None, None, {"key": [f"k{step}"], "bad_samples": {}}, step - 1)
    recorder._file.write('{"step": 6, "ep')  # killed mid-line
    recorder.teardown(trainer, None, "fit")
    trainer.global_step = 3  # the restart resumes from the checkpoint of step 3
    recorder.on_train_start(trainer, None)
    recorder.teardown(trainer, None, "fit")
    assert [r["step"] for r in read_lines(tmp_path / "keys" / "rank1.jsonl")] == [1, 2, 3]
