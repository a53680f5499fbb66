"""Accuracy on the calibrated synthetic data: MMNet, simple concat, each single magnification, the magnification-
independent classifier (any_mag), MMNet on four fields of each magnification, the -HMA and -CMF ablations and the
linear probe over the patient-wise CV folds, through main.py's own stages.

python tests/benchmarks/bench_accuracy.py [--root DIR] [--work DIR] [--per-mag N] [--seed S] [--epochs N]
    [--tuples-per-patient N] [--image-size S] [--jobs N] [--modes finetune,frozen,lpft] [--frozen-epochs N]
    [--runs a,b] [--difficulty easy|default|hard] [--bootstrap N] [-- main.py flags]

The tree is the `full` preset's 82 patients (--difficulty, default `default`) with --per-mag images per magnification, generated
under --work unless --root is given. Each mode is one main.py call (--demo settings unless overridden after `--`):
finetune (the default training), frozen (--freeze-backbone) and lpft (--frozen-epochs N). Printed: patient-level
test AUC (and tuple-level AUC) mean ± std over the folds per run, then MMNet minus the best single magnification and minus each other run
with a 95 % paired bootstrap CI (test patients resampled within each fold, one resample for both runs, the fold mean
of AUCs compared). The last line reads `accuracy: mmnet A, best single B (MAG), gain G [LO, HI]`.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from main_runs import run_main  # noqa: E402
from preprocess.synthetic import make_synthetic  # noqa: E402
from utils.scoring import cv_splits, level_frame, load_runs  # noqa: E402
from utils.stats import fold_aucs, paired_auc_gain  # noqa: E402

REFERENCE = "mmnet"
RUNS = ("mmnet", "simple_concat", "single_40X", "single_100X", "single_200X", "single_400X", "any_mag",
        "mmnet_fields_40X", "mmnet_fields_100X", "mmnet_fields_200X", "mmnet_fields_400X", "mmnet_no_hma",
        "mmnet_no_cmf", "linear_probe")
MODE_FLAGS = {"finetune": [], "frozen": ["--freeze-backbone"], "lpft": ["--frozen-epochs"]}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="", help="BreakHis-like tree; default: generated under --work")
    p.add_argument("--work", default="/tmp/bench_accuracy")
    p.add_argument("--per-mag", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--tuples-per-patient", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--modes", default="finetune")
    p.add_argument("--difficulty", default="default", choices=["easy", "default", "hard"])
    p.add_argument("--frozen-epochs", type=int, default=3)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("extra", nargs="*", help="flags after -- go to main.py")
    return p.parse_args()


def data_root(args):
    if args.root:
        return Path(args.root)
    tag = "" if args.difficulty == "default" else f"_{args.difficulty}"
    root = Path(args.work) / f"data_full_{args.per_mag}_{args.seed}{tag}"
    if not root.exists():
        make_synthetic(root, preset="full", seed=args.seed, difficulty=args.difficulty, counts=None,
                       per_mag=args.per_mag, size=(175, 115))
    return root


def train_mode(args, mode, root):
    """One main.py call: analyze, split and every training stage for the selected runs; its wall time."""
    out = Path(args.work) / f"out_{mode}_{args.seed}" / root.name
    flags = MODE_FLAGS[mode] + ([str(args.frozen_epochs)] if mode == "lpft" else [])
    cmd = [sys.executable, str(REPO / "main.py"), "--demo", "--data-root", str(root), "--output-dir", str(out),
           "--stages", "analyze,split,cv,baselines,ablations", "--runs", args.runs, "--seed", str(args.seed),
           "--epochs", str(args.epochs), "--tuples-per-patient", str(args.tuples_per_patient),
           "--image-size", str(args.image_size), "--jobs", str(args.jobs), *flags, *args.extra]
    print(f"[{mode}] {' '.join(cmd[1:])}", flush=True)
    return out, run_main(cmd, f"in mode {mode}")


def fold_patients(splits, level="patient"):
    """{fold: (labels, probabilities)} of the test patients (or tuples) of each CV fold."""
    out = {}
    for split in cv_splits(splits):
        p = level_frame(splits[split]["pred"], level, "test").sort_values(["patient_id", "tuple_id"])
        out[split] = (p["label"].to_numpy().astype(int), p["prob_malignant"].to_numpy(dtype=float))
    return out


def collect(args, modes, root):
    """{label: per-fold test patients} over the modes; labels carry the mode unless it is finetune."""
    results, tuples, seconds = {}, {}, {}
    for mode in modes:
        out, seconds[mode] = train_mode(args, mode, root)
        for name, splits in load_runs(out / "runs").items():
            label = name if mode == "finetune" else f"{name} [{mode}]"
            if name == "linear_probe" and mode != "finetune" and "linear_probe" in results:
                continue
            results[label] = fold_patients(splits)
            tuples[label] = fold_aucs(fold_patients(splits, "tuple"))
    return results, tuples, seconds


def main():
    args = parse_args()
    modes = [m for m in args.modes.split(",") if m]
    root = data_root(args)
    results, tuples, seconds = collect(args, modes, root)
    print(f"\ndata {root} | seed {args.seed} | {args.image_size} px | {args.epochs} epochs | "
          f"{args.tuples_per_patient} tuples/patient | wall " + ", ".join(f"{m} {s:.0f}s" for m, s in seconds.items()))
    print(f"{'run':<28} {'folds':>5} {'patient AUC':>16} {'tuple AUC':>16}")
    for label, patients in results.items():
        aucs, t = fold_aucs(patients), tuples[label]
        print(f"{label:<28} {len(aucs):>5} {np.nanmean(aucs):>8.3f} ± {np.nanstd(aucs):.3f} "
              f"{np.nanmean(t):>8.3f} ± {np.nanstd(t):.3f}")
    ref = results[REFERENCE]
    singles = {k: v for k, v in results.items() if k.startswith("single_") and "[" not in k}
    print(f"\n{REFERENCE} minus ... (fold-mean patient AUC, 95 % paired bootstrap CI, {args.bootstrap} resamples)")
    for label, patients in results.items():
        if label == REFERENCE:
            continue
        g, lo, hi = paired_auc_gain(ref, patients, args.bootstrap, args.seed)
        print(f"  {label:<26} {g:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if not singles:
        print("no single-magnification run in --runs: no last accuracy line (add single_40X,... to --runs)")
        return
    best = max(singles, key=lambda k: np.nanmean(fold_aucs(singles[k])))
    g, lo, hi = paired_auc_gain(ref, singles[best], args.bootstrap, args.seed)
    a, b = np.nanmean(fold_aucs(ref)), np.nanmean(fold_aucs(singles[best]))
    print(f"accuracy: mmnet {a:.3f}, best single {b:.3f} ({best.removeprefix('single_')}), gain {g:+.3f} "
          f"[{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main()
