"""Training modes for a pretrained CNN backbone, with time: fine-tuning the whole backbone, fine-tuning a backbone
cut after a middle stage, frozen middle or last stage(s), and LP-FT from a middle stage; MMNet over the patient-wise
CV folds of the calibrated synthetic data and of a real BreakHis tree.

python tests/benchmarks/bench_modes.py [--seeds 0] [--difficulty default] [--real DIR] [--real-flags "..."]
    [--arms "finetune@-1 finetune@2 frozen@2 frozen@-1 lpft@2"] [--work DIR] [--per-mag N] [--epochs N]
    [--tuples-per-patient N] [--image-size S] [--frozen-epochs N] [--runs mmnet] [--threads N] [-- main.py flags]

An arm is MODE@STAGES: finetune (every kept backbone block trains; at a middle stage the backbone is cut after it),
frozen (--freeze-backbone: only MMNet's own modules train, on cached features) or lpft (--frozen-epochs N frozen
epochs, then fine-tuning), reading --feature-stage STAGES. Each arm is one main.py call (stages analyze,split,cv;
--jobs 1; the image and feature caches shared between arms) with --demo settings and the flags after `--` on the
synthetic trees (the `full` preset's 82 patients, one tree per seed), and --real-flags on the real tree. Printed per
data and arm: pooled test patient AUC (all folds' test patients together, mean over seeds), per-fold patient AUC
mean ± std over seeds x folds, test patient accuracy at the rule in force (fixed 0.5 by default) mean ± std, the
arm's mean wall time, and its per-fold patient AUC minus the first arm's with a 95 % paired bootstrap CI (test
patients resampled within each seed's fold, one resample for both arms). The last line reads
`modes: best ARM auc A ± S (synthetic), ARM1 A1 ± S1 T1 s, ...` (per-fold patient AUC over seeds x folds and the
mean wall time of each arm on the synthetic trees; best: highest mean, then lowest spread).
"""
import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import fold_patients  # noqa: E402
from main_runs import run_main, tree  # noqa: E402
from utils.helpers import read_json  # noqa: E402
from utils.scoring import BLOCKS, load_runs  # noqa: E402
from utils.stats import fold_aucs, paired_auc_gain  # noqa: E402

MODE_FLAGS = {"finetune": [], "frozen": ["--freeze-backbone"], "lpft": ["--frozen-epochs"]}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0")
    p.add_argument("--difficulty", default="default", choices=["easy", "default", "hard"])
    p.add_argument("--real", default="", help="a real BreakHis tree, e.g. ../shared/data/breakhis_real")
    p.add_argument("--real-flags", default="", help="main.py flags for the real tree (quoted)")
    p.add_argument("--real-only", action="store_true", help="skip the synthetic trees")
    p.add_argument("--arms", default="finetune@-1 finetune@2 frozen@2 frozen@-1 lpft@2")
    p.add_argument("--work", default="/tmp/bench_modes")
    p.add_argument("--per-mag", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--tuples-per-patient", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--frozen-epochs", type=int, default=3)
    p.add_argument("--runs", default="mmnet")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each main.py call (1: fastest on a busy CPU)")
    p.add_argument("extra", nargs="*", help="flags after -- go to main.py for the synthetic trees")
    return p.parse_args()


def arm_flags(arm, frozen_epochs):
    mode, _, stages = arm.partition("@")
    if mode not in MODE_FLAGS or not stages:
        sys.exit(f"arm '{arm}': write MODE@STAGES with MODE one of {', '.join(MODE_FLAGS)}, e.g. frozen@2")
    return MODE_FLAGS[mode] + ([str(frozen_epochs)] if mode == "lpft" else []) + ["--feature-stage", stages]


def train(args, tag, root, seed, arm, flags):
    """One arm on one tree: {run: (per-fold test patients, per-fold accuracy at the rule in force)} and wall time."""
    out = Path(args.work) / f"out_{tag}_{seed}" / arm.replace("@", "_").replace(",", "+")
    cmd = [sys.executable, str(REPO / "main.py"), "--data-root", str(root), "--output-dir", str(out), "--cache-dir",
           str(Path(args.work) / f"cache_{tag}_{seed}"), "--stages", "analyze,split,cv", "--runs", args.runs,
           "--seed", str(seed), "--jobs", "1", "--epochs", str(args.epochs), "--tuples-per-patient",
           str(args.tuples_per_patient), "--image-size", str(args.image_size), *flags,
           *arm_flags(arm, args.frozen_epochs)]
    print(f"[{tag} | seed {seed} | {arm}] {' '.join(cmd[1:])}", flush=True)
    seconds = wall_time(out, run_main(cmd, f"for {tag}, seed {seed}, arm {arm}", args.threads))
    print(f"  {seconds:.0f} s", flush=True)
    rule = BLOCKS[read_json(out / "config.json")["config"]["threshold_rule"]]
    results = {}
    for name, splits in load_runs(out / "runs").items():
        accs = [read_json(p)["test"]["patient"][rule]["accuracy"]
                for p in sorted((out / "runs" / name).glob("fold_*/metrics.json"))]
        results[name] = (fold_patients(splits), accs)
    return results, seconds


def wall_time(out, seconds):
    """The arm's wall time, kept beside its output: a rerun that finds the runs finished reports the first one."""
    kept = out / "bench_wall_s.txt"
    if not kept.exists():
        kept.write_text(f"{seconds:.1f}")
    return float(kept.read_text())


def pooled_auc(patients):
    y = np.concatenate([v[0] for v in patients.values()])
    p = np.concatenate([v[1] for v in patients.values()])
    return roc_auc_score(y, p) if len(set(y)) == 2 else float("nan")


def seed_folds(by_seed, arm, name):
    """{(seed, fold): (labels, probabilities)} of one arm's run over every seed."""
    return {(s, f): v for s, res in by_seed.items() for f, v in res[arm][0][name][0].items()}


def rows(tag, by_seed, bootstrap):
    """Printed rows of one data source, each arm against the first (paired bootstrap over seeds x folds);
    {arm: (per-fold AUCs over seeds, mean seconds)} of the first run."""
    summary, first = {}, next(iter(by_seed.values()))
    reference = next(iter(first))
    for arm in first:
        for name in first[arm][0]:
            per_seed = [res[arm][0][name] for res in by_seed.values()]
            aucs = np.concatenate([fold_aucs(patients) for patients, _ in per_seed])
            accs = np.concatenate([a for _, a in per_seed])
            pooled = np.mean([pooled_auc(patients) for patients, _ in per_seed])
            seconds = np.mean([res[arm][1] for res in by_seed.values()])
            g, lo, hi = paired_auc_gain(seed_folds(by_seed, arm, name), seed_folds(by_seed, reference, name),
                                        bootstrap, 0)
            gain = "" if arm == reference else f"{g:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            print(f"{tag:<10} {arm:<14} {name:<8} {pooled:>7.3f} {np.nanmean(aucs):>8.3f} ± {np.nanstd(aucs):.3f} "
                  f"{np.mean(accs):>8.3f} ± {np.std(accs):.3f} {len(aucs):>5} {seconds:>7.0f}  {gain}")
            summary.setdefault(arm, (aucs, seconds))
    return summary


def main():
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    arms = args.arms.split()
    sources = {}
    if not args.real_only:
        synthetic_flags = ["--demo", *args.extra]
        sources[args.difficulty] = {s: {a: train(args, args.difficulty, tree(args, s), s, a, synthetic_flags)
                                        for a in arms} for s in seeds}
    if args.real:
        real_flags = shlex.split(args.real_flags)
        sources["real"] = {s: {a: train(args, "real", Path(args.real), s, a, real_flags) for a in arms}
                           for s in seeds}
    print(f"\nseeds {seeds} | synthetic: {args.image_size} px, {args.epochs} epochs, "
          f"{args.tuples_per_patient} tuples/patient | real: {args.real_flags or '-'}")
    print(f"{'data':<10} {'arm':<14} {'run':<8} {'pooled':>7} {'patient AUC/fold':>16} {'patient acc':>15} "
          f"{'folds':>5} {'wall s':>7}  vs {arms[0]} (95 % CI)")
    summaries = {tag: rows(tag, by_seed, args.bootstrap) for tag, by_seed in sources.items()}
    synthetic = summaries.get(args.difficulty)
    if not synthetic:
        return
    best = max(synthetic, key=lambda a: (round(np.nanmean(synthetic[a][0]), 3), -np.nanstd(synthetic[a][0])))
    print(f"modes: best {best} auc {np.nanmean(synthetic[best][0]):.3f} ± {np.nanstd(synthetic[best][0]):.3f} "
          f"(synthetic), " + ", ".join(f"{a} {np.nanmean(v):.3f} ± {np.nanstd(v):.3f} {s:.0f} s"
                                       for a, (v, s) in synthetic.items()))


if __name__ == "__main__":
    main()
