"""Decision-threshold rules with few validation patients: Youden on the fold's validation patients (val_youden),
a fixed 0.5 with the class-balanced loss (fixed_0.5) and Youden on the out-of-fold predictions of K inner models over
the fold's train+val patients (oof_youden), for MMNet and the linear probe over the patient-wise CV folds.

python tests/benchmarks/bench_thresholds.py [--seeds 0,1,2] [--difficulties hard,default] [--real DIR]
    [--work DIR] [--per-mag N] [--epochs N] [--tuples-per-patient N] [--image-size S] [--inner-folds K]
    [--runs mmnet,linear_probe] [--threads N] [--real-flags "..."] [-- main.py flags for the synthetic trees]

One main.py call per tree (`--threshold-rule oof_youden`, so every run holds all three thresholds, measured on the
same models): each seed draws its own tree (the `full` preset's 82 patients, --per-mag images per magnification) at
each difficulty, trained with --demo settings, --freeze-backbone and --jobs 1 unless overridden after `--`. With
--real, the same on a real BreakHis tree (the shared 23-patient set) with --real-flags (e.g. ImageNet
EfficientNet-Lite0 frozen). Printed per data, run and rule: test patient accuracy mean ± std over seeds x folds, the
std of the seed means, balanced accuracy, and the mean threshold. The last line reads
`thresholds: best RULE acc A ± S (synthetic RUN), val_youden A1 ± S1, fixed_0.5 A2 ± S2, oof_youden A3 ± S3` (RUN:
the first of --runs; best: highest mean, then lowest spread).
"""
import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from main_runs import run_main, tree  # noqa: E402
from utils.helpers import read_json  # noqa: E402
from utils.scoring import BLOCKS, DECISION_RULES  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--difficulties", default="hard,default")
    p.add_argument("--real", default="", help="a real BreakHis tree, e.g. ../shared/data/breakhis_real")
    p.add_argument("--real-flags", default="", help="main.py flags for the real tree (quoted)")
    p.add_argument("--work", default="/tmp/bench_thresholds")
    p.add_argument("--per-mag", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--tuples-per-patient", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--inner-folds", type=int, default=5)
    p.add_argument("--runs", default="mmnet,linear_probe")
    p.add_argument("--tree-seed", type=int, default=-1, help="one synthetic tree for every seed (splits and "
                   "training still follow the seed); default: each seed draws its own tree")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each main.py call (1: fastest on a busy CPU)")
    p.add_argument("extra", nargs="*", help="flags after -- go to main.py for the synthetic trees")
    return p.parse_args()


def train(args, tag, root, seed, flags, tree_seed=None):
    """Every fold of every run of one tree: {run: [{rule: (accuracy, balanced accuracy, threshold)}]}."""
    tree_seed = seed if tree_seed is None else tree_seed
    out = Path(args.work) / (f"out_{tag}_{seed}" if tree_seed == seed else f"out_{tag}_{seed}_tree{tree_seed}")
    cache = Path(args.work) / f"out_{tag}_{tree_seed}" / "cache"
    cmd = [sys.executable, str(REPO / "main.py"), "--data-root", str(root), "--output-dir", str(out), "--cache-dir",
           str(cache), "--stages",
           "analyze,split,cv,baselines", "--runs", args.runs, "--seed", str(seed), "--jobs", "1",
           "--threshold-rule", "oof_youden", "--inner-folds", str(args.inner_folds), "--epochs", str(args.epochs),
           "--tuples-per-patient", str(args.tuples_per_patient), "--image-size", str(args.image_size), *flags]
    print(f"[{tag} | seed {seed}] {' '.join(cmd[1:])}", flush=True)
    print(f"  {run_main(cmd, f'for {tag}, seed {seed}', args.threads):.0f} s", flush=True)
    results = {}
    for name in args.runs.split(","):
        for path in sorted((out / "runs" / name).glob("fold_*/metrics.json")):
            m = read_json(path)
            p = m["test"]["patient"]
            thr = {"fixed_0.5": 0.5, "val_youden": m["threshold"]["patient"]["youden"],
                   "oof_youden": m["threshold"]["patient"].get("oof_youden", np.nan)}
            results.setdefault(name, []).append({r: (p[BLOCKS[r]]["accuracy"], p[BLOCKS[r]]["balanced_accuracy"], thr[r])
                                                 for r in DECISION_RULES if BLOCKS[r] in p})
    return results


def table(tag, by_seed):
    """Print one data source's rows: patient accuracy over seeds x folds per run and rule."""
    runs = sorted({r for res in by_seed.values() for r in res}, key=lambda r: r != "mmnet")
    for name in runs:
        for rule in DECISION_RULES:
            folds = [f[rule] for res in by_seed.values() for f in res.get(name, []) if rule in f]
            if not folds:
                continue
            acc, bal, thr = (np.array(v, dtype=float) for v in zip(*folds))
            seed_means = [np.mean([f[rule][0] for f in res.get(name, [])]) for res in by_seed.values()]
            print(f"{tag:<10} {name:<13} {rule:<11} {acc.mean():>6.3f} ± {acc.std():.3f} {np.std(seed_means):>9.3f} "
                  f"{bal.mean():>8.3f} {np.nanmean(thr):>6.2f} {len(folds):>6}")


def main():
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    def tree_of(s):
        return s if args.tree_seed < 0 else args.tree_seed
    synthetic_flags = ["--demo", "--freeze-backbone", *args.extra]
    sources = {d: {s: train(args, d, tree(args, tree_of(s), d), s, synthetic_flags, tree_of(s)) for s in seeds}
               for d in args.difficulties.split(",") if d}
    if args.real:
        sources["real"] = {s: train(args, "real", Path(args.real), s, shlex.split(args.real_flags)) for s in seeds}
    print(f"\nseeds {seeds} | {args.image_size} px | {args.epochs} epochs | {args.inner_folds} inner folds")
    print(f"{'data':<10} {'run':<13} {'rule':<11} {'patient acc':>14} {'seed std':>9} {'bal acc':>8} {'thr':>6} "
          f"{'folds':>6}")
    for tag, by_seed in sources.items():
        table(tag, by_seed)
    first, synthetic = args.runs.split(",")[0], {}
    for tag, by_seed in sources.items():
        folds = [f for res in by_seed.values() for f in res.get(first, [])] if tag != "real" else []
        for rule in DECISION_RULES:
            synthetic.setdefault(rule, []).extend(f[rule][0] for f in folds if rule in f)
    stats = {r: (np.mean(v), np.std(v)) for r, v in synthetic.items() if v}
    if not stats:
        return
    best = max(stats, key=lambda r: (round(stats[r][0], 3), -stats[r][1]))
    print(f"thresholds: best {best} acc {stats[best][0]:.3f} ± {stats[best][1]:.3f} (synthetic {first}), "
          + ", ".join(f"{r} {m:.3f} ± {s:.3f}" for r, (m, s) in stats.items()))


if __name__ == "__main__":
    main()
