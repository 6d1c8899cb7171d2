"""``data.record_keys=true``: every rank appends the ``__key__`` of each sample it trains on to
``RUN_DIR/keys/rank<r>.jsonl``, one line per optimizer step, for ``python -m clip_pl.data.audit``.

    {"step": 12, "epoch": 0, "keys": ["000010003", …], "bad": {"skipped/corrupt_image": 1, "refilled": 1}}

``step`` is the global step *after* the optimizer step that used the batch (the one a checkpoint
saved in that step's ``on_train_batch_end`` holds). A resumed run first drops the lines of steps
after its checkpoint (trained, then rolled back by the restart), so the files always describe
exactly the training that the weights went through. Cost: one short write per step and rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L

from clip_pl.data.keys import rank_file, read_lines


class KeyRecorder(L.Callback):
    def __init__(self, dirpath: str, enabled: bool = True) -> None:
        self.dirpath, self.enabled = Path(dirpath), bool(enabled)
        self._file = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        path = rank_file(self.dirpath, trainer.global_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a restart: keep what the restored weights have seen, nothing after it
            kept = [r for r in read_lines(path) if r["step"] <= trainer.global_step]
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._file is None or not isinstance(batch, dict) or "key" not in batch:
            return
        epoch = batch.get("epoch")  # the loader's own epoch (its data order); Lightning's counter as a fallback
        if epoch is None:
            epoch = trainer.fit_loop.epoch_progress.current.processed
        record = {
            "step": trainer.global_step,
            "epoch": int(epoch),
            "keys": list(batch["key"]),
            "bad": dict(batch.get("bad_samples") or {}),
        }
        self._file.write(json.dumps(record) + "\n")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
