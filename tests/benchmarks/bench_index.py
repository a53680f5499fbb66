"""Time to index and validate the full-size synthetic BreakHis tree (7,909 PNGs at 700x460)."""
import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from preprocess.analyze import build_index  # noqa: E402
from preprocess.synthetic import make_synthetic, plan  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="data/synthetic_full", help="full synthetic tree (generated when absent)")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--csv", default="", help="write the table to this CSV file")
    args = parser.parse_args(argv)
    root = Path(args.root)
    rows = []
    if not root.exists():
        start = time.time()
        make_synthetic(root, preset=args.preset, seed=0)
        seconds = time.time() - start
        rows.append(dict(step="generate", images=len(plan(args.preset, 0)), seconds=seconds))
    start = time.time()
    index, excluded = build_index(root)
    seconds = time.time() - start
    rows.append(dict(step="index+validate", images=len(index) + len(excluded), seconds=seconds))
    table = pd.DataFrame(rows)
    table["images_per_s"] = table["images"] / table["seconds"]
    table["cpus"] = len(os.sched_getaffinity(0))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
