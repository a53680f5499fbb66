"""Nested tuning against the defaults on the calibrated synthetic data: for every outer fold, `--stages tune
--tune-scope per_fold --folds k` searches the settings on that fold's training patients alone, then MMNet is trained on
the fold with them (--tuned-folds) and scored on the fold's test patients; the default arm trains the same folds with
the defaults.

python tests/benchmarks/bench_tuning.py [--seeds 0,1] [--trials 4] [--epochs 6] [--tuples-per-patient 6]
    [--per-mag 6] [--image-size 64] [--difficulty hard] [--work DIR] [-- main.py flags]

Each seed draws its own tree (the `full` preset's 82 patients, `hard` by default) and its own folds; both arms see the
same folds and seeds. Printed: test patient AUC per fold of each arm, mean ± std over seeds x folds, the paired
difference, and the tuning wall time. The last line reads
`tuning: tuned A ± S, default B ± S, tuned minus default D ± S over K folds, tuning M min`.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from main_runs import run_main, tree  # noqa: E402
from utils.helpers import RunFiles, read_json  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--work", default="/tmp/bench_tuning")
    p.add_argument("--per-mag", type=int, default=6)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--tuples-per-patient", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--difficulty", default="hard", choices=["easy", "default", "hard"])
    p.add_argument("extra", nargs="*", help="flags after -- go to main.py")
    return p.parse_args()


def main_py(args, seed, out, *flags):
    cmd = [sys.executable, str(REPO / "main.py"), *flags, "--data-root", str(tree(args, seed)), "--output-dir",
           str(out), "--seed", str(seed), "--jobs", "1", "--n-folds", str(args.folds), *args.extra]
    print(f"  {' '.join(cmd[2:])}", flush=True)
    run_main(cmd)


def base_flags(args):
    return ["--demo", "--epochs", str(args.epochs), "--tuples-per-patient", str(args.tuples_per_patient),
            "--image-size", str(args.image_size)]


def test_auc(out, fold):
    metrics = read_json(RunFiles(Path(out) / "runs" / "mmnet" / f"fold_{fold}").metrics)
    return metrics["test"]["patient"]["youden"]["auc"]


def default_arm(args, seed):
    out = Path(args.work) / f"default_{args.difficulty}_{seed}"
    main_py(args, seed, out, *base_flags(args), "--stages", "analyze,split,cv", "--runs", "mmnet")
    return [test_auc(out, k) for k in range(args.folds)]


def check_unseen(out, fold):
    """The study of fold k never trained or validated on a test patient of fold k."""
    split = pd.read_csv(out / "splits" / f"fold_{fold}.csv", dtype={"patient_id": str})
    test = set(split.loc[split.role == "test", "patient_id"])
    seen = read_json(out / "tuning" / f"fold_{fold}" / "best_config.json")["tuning_study"]["seen_patients"]
    overlap = test & (set(seen["train"]) | set(seen["val"]))
    if overlap:
        sys.exit(f"fold {fold}: the tuning study saw test patients {sorted(overlap)}")


def tuned_arm(args, seed):
    """Per outer fold: its own study on its train+val patients (--tune-scope per_fold), then the fold trained and tested
    with that study's settings (--tuned-folds)."""
    out = Path(args.work) / f"tuned_{args.difficulty}_{seed}"
    aucs, seconds = [], 0.0
    main_py(args, seed, out, *base_flags(args), "--stages", "analyze,split")
    for k in range(args.folds):
        start = time.time()
        main_py(args, seed, out, *base_flags(args), "--stages", "tune", "--tune-scope", "per_fold", "--folds", str(k),
                "--tune-trials", str(args.trials))
        seconds += time.time() - start
        check_unseen(out, k)
        main_py(args, seed, out, *base_flags(args), "--tuned-folds", str(out / "tuning"), "--stages", "cv", "--folds",
                str(k), "--runs", "mmnet")
        aucs.append(test_auc(out, k))
    return aucs, seconds


def mean_std(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main():
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    tuned, default, seconds = [], [], 0.0
    for seed in seeds:
        print(f"[seed {seed}] default settings", flush=True)
        d = default_arm(args, seed)
        print(f"[seed {seed}] nested tuning, {args.trials} trials per fold", flush=True)
        t, s = tuned_arm(args, seed)
        seconds += s
        print(f"[seed {seed}] test patient AUC per fold | default {np.round(d, 3).tolist()} | tuned "
              f"{np.round(t, 3).tolist()} | tuning {s / 60:.1f} min", flush=True)
        tuned += t
        default += d
    diff = np.array(tuned) - np.array(default)
    print(f"\nseeds {seeds} | {args.folds} folds | {args.trials} trials per fold | {args.image_size} px | "
          f"{args.epochs} epochs | {args.tuples_per_patient} tuples/patient | {args.difficulty}")
    print(f"| arm | test patient AUC, mean ± std over seeds x folds |\n|---|---|\n| default | {mean_std(default)} |\n"
          f"| tuned (nested) | {mean_std(tuned)} |")
    print(f"folds better / same / worse: {int((diff > 0).sum())} / {int((diff == 0).sum())} / {int((diff < 0).sum())}")
    print(f"tuning: tuned {mean_std(tuned)}, default {mean_std(default)}, tuned minus default {mean_std(diff)} over "
          f"{len(diff)} folds, tuning {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
