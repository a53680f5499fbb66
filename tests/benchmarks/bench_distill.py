"""Does distillation help the student? The fixed-split MMNet (teacher), then the same student trained with the
distillation term (--distill-weight W) and without it (W = 0: hard labels only), on the calibrated synthetic data.

python tests/benchmarks/bench_distill.py [--seeds 0,1] [--work DIR] [--per-mag N] [--epochs N] [--weights 0,0.7]
    [--difficulty easy|default|hard] [-- main.py flags]

Each seed draws its own tree (the `full` preset's 82 patients, --per-mag images per magnification) and trains the
teacher and every student arm with that seed on the same fixed split; the demo settings (64 px teacher, 32 px
student) unless flags after -- say otherwise. Printed per arm: fixed test patient AUC and accuracy, tuple AUC, mean
± std over seeds, and the student minus the teacher. The fixed test split holds about 12 patients: read the tuple
column and the spread before the patient one.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from main_runs import run_main, tree  # noqa: E402
from stages.training.runs import REFERENCE, STUDENT  # noqa: E402
from utils.helpers import RunFiles, read_json  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--work", default="/tmp/bench_distill")
    p.add_argument("--per-mag", type=int, default=6)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--weights", default="0,0.7")
    p.add_argument("--difficulty", default="hard", choices=["easy", "default", "hard"])
    p.add_argument("extra", nargs="*", help="flags after -- go to main.py")
    return p.parse_args()


def main_py(args, seed, stages, *flags):
    out = Path(args.work) / f"out_{args.difficulty}_{seed}"
    cmd = [sys.executable, str(REPO / "main.py"), "--demo", "--data-root", str(tree(args, seed)), "--output-dir",
           str(out), "--stages", stages, "--seed", str(seed), "--epochs", str(args.epochs), "--jobs", "1", *flags,
           *args.extra]
    print(f"[seed {seed}] {' '.join(cmd[2:])}", flush=True)
    run_main(cmd, f"for seed {seed}")
    return out


def scores(metrics):
    test = metrics["test"]
    return (test["patient"]["youden"]["auc"], test["patient"]["youden"]["accuracy"], test["tuple"]["t0.5"]["auc"])


def seed_results(args, seed, weights):
    """{arm: (patient AUC, patient accuracy, tuple AUC)} of the teacher and each student arm for one seed."""
    out = main_py(args, seed, "analyze,split,fixed", "--runs", REFERENCE)
    rows = {"teacher": scores(read_json(RunFiles(out / "runs" / REFERENCE / "fixed").metrics))}
    for w in weights:
        main_py(args, seed, "distill", "--runs", STUDENT, "--distill-weight", str(w), "--force")
        rows[f"student W={w}"] = scores(read_json(RunFiles(out / "runs" / STUDENT / "fixed").metrics))
    return rows


def main():
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    weights = [float(w) for w in args.weights.split(",") if w]
    results = [seed_results(args, seed, weights) for seed in seeds]
    print(f"\nseeds {seeds} | {args.difficulty} | {args.epochs} epochs | mean ± std over seeds")
    print(f"{'arm':<16} {'patient AUC':>14} {'patient acc':>14} {'tuple AUC':>14} {'tuple AUC - teacher':>20}")
    teacher = np.array([r["teacher"][2] for r in results])
    for arm in results[0]:
        values = np.array([r[arm] for r in results])
        mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
        gap = values[:, 2] - teacher
        print(f"{arm:<16} " + " ".join(f"{m:>7.3f} ± {s:.3f}" for m, s in zip(mean, std))
              + f" {np.mean(gap):>+11.3f} ± {np.std(gap):.3f}")


if __name__ == "__main__":
    main()
