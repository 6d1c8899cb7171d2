"""Build the demo corpus (see data_prep/demo/build.py for the layout).

python -m data_prep.demo --out demo_data [--image-size 64 --copies 2 --fault-share 0.1 --seed 0]
"""

import argparse
import sys

from data_prep.demo.build import build_demo_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.demo", description="Build the digits demo corpus.")
    p.add_argument("--out", required=True, help="output folder (its shards/ and test/ are rebuilt)")
    p.add_argument("--image-size", type=int, default=64, help="size of the stored training images")
    p.add_argument("--copies", type=int, default=2, help="URLs (each with its own caption) per training image")
    p.add_argument("--fault-share", type=float, default=0.1, help="share of URLs given an injected fault")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=None)
    p.add_argument("--num-shards", type=int, default=8, help="training shards (before hygiene drops)")
    args = p.parse_args(argv)
    manifest = build_demo_corpus(
        args.out,
        image_size=args.image_size,
        copies=args.copies,
        fault_share=args.fault_share,
        seed=args.seed,
        processes=args.processes,
        num_shards=args.num_shards,
    )
    faults_ok = all(row["counted"] == row["injected"] for row in manifest["faults"].values())
    return 0 if faults_ok and manifest["stats"]["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
