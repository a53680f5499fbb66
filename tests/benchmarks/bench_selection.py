"""Model selection with few validation patients: MMNet over the CV folds under each --selection rule, and under the
default rule with a doubled inner validation share, on the calibrated synthetic data over several seeds.

python tests/benchmarks/bench_selection.py [--seeds 0,1] [--work DIR] [--per-mag N] [--epochs N]
    [--tuples-per-patient N] [--image-size S] [--jobs N] [--arms auc,smooth,loss,ema,swa,auc_val30]
    [--difficulty easy|default|hard] [-- main.py flags]

Each seed draws its own tree (the `full` preset's 82 patients, --per-mag images per magnification, the calibrated
`default` difficulty) and trains with that seed; every rule sees the same trees, folds and seeds. Printed per rule:
test patient AUC mean over seeds x folds, the mean within-seed standard deviation over folds, the standard deviation
of the seed means, the mean tuple-level AUC and the mean kept epoch. The last line reads `selection: best RULE A ± S, auc A0 ± S0` (mean ± std over seeds x folds).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from main_runs import run_main, tree  # noqa: E402
from utils.helpers import read_json  # noqa: E402

ARMS = {"auc": [], "smooth": [], "loss": [], "ema": [], "swa": [], "auc_val30": ["--val-fraction", "0.30"]}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--work", default="/tmp/bench_selection")
    p.add_argument("--per-mag", type=int, default=6)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--tuples-per-patient", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--difficulty", default="default", choices=["easy", "default", "hard"])
    p.add_argument("extra", nargs="*", help="flags after -- go to main.py")
    return p.parse_args()


def arm_flags(arm):
    rule = arm.split("_")[0]
    return ["--selection", rule, *ARMS[arm]]


def train(args, arm, seed):
    """MMNet over the CV folds under one arm: [(test patient AUC, kept epoch)] per fold."""
    out = Path(args.work) / f"selection_{args.difficulty}_{arm}_{seed}"
    cmd = [sys.executable, str(REPO / "main.py"), "--demo", "--data-root", str(tree(args, seed)), "--output-dir",
           str(out), "--stages", "analyze,split,cv", "--runs", "mmnet", "--seed", str(seed), "--epochs",
           str(args.epochs), "--tuples-per-patient", str(args.tuples_per_patient), "--image-size",
           str(args.image_size), "--jobs", str(args.jobs), *arm_flags(arm), *args.extra]
    print(f"[{arm} | seed {seed}] {' '.join(cmd[1:])}", flush=True)
    run_main(cmd, f"for {arm}, seed {seed}")
    metrics = [read_json(p) for p in sorted((out / "runs" / "mmnet").glob("fold_*/metrics.json"))]
    return [(m["test"]["patient"]["youden"]["auc"], m["best_epoch"], m["test"]["tuple"]["youden"]["auc"])
            for m in metrics]


def main():
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    arms = [a for a in args.arms.split(",") if a]
    results = {arm: {seed: train(args, arm, seed) for seed in seeds} for arm in arms}
    print(f"\nseeds {seeds} | {args.image_size} px | {args.epochs} epochs | {args.tuples_per_patient} tuples/patient")
    print(f"{'rule':<16} {'AUC mean':>9} {'fold std':>9} {'seed std':>9} {'tuple AUC':>10} {'kept epoch':>11}")
    summary = {}
    for arm, by_seed in results.items():
        aucs = np.array([a for folds in by_seed.values() for a, _, _ in folds])
        seed_means = [np.nanmean([a for a, _, _ in folds]) for folds in by_seed.values()]
        fold_std = np.nanmean([np.nanstd([a for a, _, _ in folds]) for folds in by_seed.values()])
        epochs = np.mean([e for folds in by_seed.values() for _, e, _ in folds])
        tuple_auc = np.nanmean([t for folds in by_seed.values() for _, _, t in folds])
        summary[arm] = (np.nanmean(aucs), np.nanstd(aucs))
        print(f"{arm:<16} {np.nanmean(aucs):>9.3f} {fold_std:>9.3f} {np.nanstd(seed_means):>9.3f} {tuple_auc:>10.3f} "
              f"{epochs:>11.1f}")
    best = max(summary, key=lambda k: (summary[k][0], -summary[k][1]))
    base = summary.get("auc", (float("nan"), float("nan")))
    print(f"selection: best {best} {summary[best][0]:.3f} ± {summary[best][1]:.3f}, auc {base[0]:.3f} ± {base[1]:.3f}")


if __name__ == "__main__":
    main()
