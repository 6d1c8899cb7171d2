"""Was every sample trained exactly once? Reads the key files of ``data.record_keys=true``.

    python -m clip_pl.data.audit runs/<run>                          # epoch size from the run's config
    python -m clip_pl.data.audit runs/<run> --sizes /data/cc3m/sizes.json [--json report.json]

Per epoch it reports: samples trained, duplicates, samples of the manifest never trained, and what
the loader explains: the remainder each exact epoch leaves out (N mod (ranks × batch) positions),
the bad samples it skipped and the good ones it used to refill their places (``refilled``, at most
one duplicate each). A complete epoch passes when it has no duplicate beyond the refills and no
missing sample beyond remainder + skipped; the last, partial epoch of a run only needs no
duplicate beyond its refills. A (rank, step) recorded twice also fails: a restart replayed a step.
Exit status 0 only if every epoch passes. Run it after a preempted job: the key files survive
requeues (clip_pl/data/keys.py trims the steps a restart rolled back).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from clip_pl.data.keys import read_lines


def epoch_samples_from_config(run_dir: Path) -> int:
    """Samples per epoch of the run as configured (``RUN_DIR/.hydra/config.yaml``)."""
    from omegaconf import OmegaConf

    from clip_pl.data.shardspec import resolve_shards

    config = run_dir / ".hydra" / "config.yaml"
    if not config.exists():
        raise SystemExit(f"audit: {config} not found; pass --sizes sizes.json (the manifest the run trained on).")
    data = OmegaConf.load(config).data
    total = resolve_shards(data.train_shards, None, data.get("sizes_file")).total_samples
    if total is None:
        raise SystemExit("audit: the run's shards have no sizes.json; pass --sizes.")
    return min(total, int(data.num_samples)) if data.get("num_samples") else total


def epoch_samples_from_sizes(path: Path) -> int:
    path = path / "sizes.json" if path.is_dir() else path
    return sum(int(v) for v in json.loads(path.read_text()).values())


def audit(run_dir: Path, epoch_samples: int) -> dict:
    files = sorted((run_dir / "keys").glob("rank*.jsonl"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise SystemExit(f"audit: no key files in {run_dir / 'keys'}; train with data.record_keys=true.")
    world = len(files)
    records = {int(p.stem[4:]): read_lines(p) for p in files}
    batch_sizes = {len(r["keys"]) for lines in records.values() for r in lines}
    if len(batch_sizes) != 1:
        raise SystemExit(f"audit: batches of different sizes {sorted(batch_sizes)} in the key files.")
    batch = batch_sizes.pop()
    steps_per_epoch = epoch_samples // (world * batch)
    remainder = epoch_samples - steps_per_epoch * world * batch
    epochs: dict[int, dict] = defaultdict(lambda: {"keys": Counter(), "bad": Counter(), "steps": defaultdict(list)})
    for rank, lines in records.items():
        for r in lines:
            e = epochs[int(r["epoch"])]
            e["keys"].update(r["keys"])
            e["bad"].update(r.get("bad") or {})
            e["steps"][rank].append(int(r["step"]))
    report = {
        "run_dir": str(run_dir),
        "world_size": world,
        "batch_size": batch,
        "epoch_samples": epoch_samples,
        "steps_per_epoch": steps_per_epoch,
        "remainder_per_epoch": remainder,
        "epochs": [],
        "ok": True,
    }
    last_epoch = max(epochs) if epochs else None
    for epoch in sorted(epochs):
        e = epochs[epoch]
        trained = sum(e["keys"].values())
        distinct = len(e["keys"])
        duplicates = trained - distinct
        skipped = sum(v for k, v in e["bad"].items() if k.startswith("skipped/"))
        refilled = int(e["bad"].get("refilled", 0))
        replayed = {rank: sorted(s for s, n in Counter(steps).items() if n > 1) for rank, steps in e["steps"].items()}
        replayed = {rank: s for rank, s in replayed.items() if s}
        complete = len(e["steps"]) == world and all(len(s) == steps_per_epoch for s in e["steps"].values())
        missing = epoch_samples - distinct if complete else None
        problems = []
        if duplicates > refilled:
            dup_keys = [k for k, n in e["keys"].items() if n > 1][:5]
            problems.append(f"{duplicates} duplicates, {refilled} explained by refills (e.g. {dup_keys})")
        if replayed:
            problems.append(f"steps recorded twice: {replayed}")
        if complete and missing > remainder + skipped:
            problems.append(
                f"{missing} samples never trained, {remainder} remainder + {skipped} skipped explain "
                f"{remainder + skipped}"
            )
        if not complete and epoch != last_epoch:
            problems.append(
                f"incomplete ({ {r: len(s) for r, s in sorted(e['steps'].items())} } steps by rank, "
                f"{steps_per_epoch} expected) yet a later epoch started: steps were lost"
            )
        if any(len(s) > steps_per_epoch for s in e["steps"].values()):
            problems.append(f"more than {steps_per_epoch} steps on a rank")
        report["epochs"].append(
            {
                "epoch": epoch,
                "complete": complete,
                "trained": trained,
                "distinct": distinct,
                "duplicates": duplicates,
                "missing": missing,
                "skipped": skipped,
                "refilled": refilled,
                "problems": problems,
            }
        )
        report["ok"] = report["ok"] and not problems
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clip_pl.data.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--sizes", type=Path, default=None, help="the manifest (sizes.json, or its folder); default: the run's config"
    )
    p.add_argument("--epoch-samples", type=int, default=None, help="samples per epoch, if not the manifest's sum")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.epoch_samples:
        n = args.epoch_samples
    elif args.sizes:
        n = epoch_samples_from_sizes(args.sizes)
    else:
        n = epoch_samples_from_config(args.run_dir)
    report = audit(args.run_dir, n)
    print(
        f"{report['run_dir']}: {report['world_size']} ranks × batch {report['batch_size']}, {n} samples per "
        f"epoch → {report['steps_per_epoch']} steps, {report['remainder_per_epoch']} left out per epoch"
    )
    print(
        f"{'epoch':>5} {'complete':>8} {'trained':>8} {'distinct':>8} {'dups':>5} {'missing':>7} "
        f"{'skipped':>7} {'refilled':>8}  result"
    )
    for e in report["epochs"]:
        missing = "-" if e["missing"] is None else e["missing"]
        print(
            f"{e['epoch']:>5} {str(e['complete']):>8} {e['trained']:>8} {e['distinct']:>8} {e['duplicates']:>5} "
            f"{missing:>7} {e['skipped']:>7} {e['refilled']:>8}  {'; '.join(e['problems']) or 'ok'}"
        )
    print("every sample exactly once" if report["ok"] else "FAILED: see the problems above")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
