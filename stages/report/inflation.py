"""Table 9, protocol: MMNet and any_mag trained and tested under an image-level random split (the protocol stage,
output/protocol/) beside the same models' patient-wise CV runs: how much a split with a patient's images on both
sides inflates the numbers. A measure of inflation, never a result."""
from pathlib import Path

import numpy as np
import pandas as pd

from stages.report.paper import PaperTable, assemble, with_ci
from stages.training.protocol import FOLDER, RUNS
from utils.helpers import mean_std, num
from utils.metrics import percentile_ci, rank_auc, weighted_auc
from utils.scoring import LEVELS, cv_splits, load_run, real_patient, scored_frame
from utils.stats import drawn_weights, resampler

PROTOCOLS = ("image_level", "patient_wise")


def protocol_runs(cfg, name):
    """{fold: run} of one model under the image-level split, read without the leak guard that refuses them
    elsewhere."""
    folders = sorted((Path(cfg.output_dir) / FOLDER / "runs" / name).glob("fold_*/metrics.json"))
    return {p.parent.name: load_run(p.parent) for p in folders}


def also_trained(run):
    """Test patients of a run with images among its training images."""
    test = set(run["pred"].loc[run["pred"]["role"] == "test", "patient_id"].map(real_patient))
    train = set(map(real_patient, (run["record"] or {}).get("seen_patients", {}).get("train", [])))
    return len(test & train), len(test)


def fold_frames(splits, level, rule):
    frames = {s: scored_frame(splits[s], level, rule) for s in cv_splits(splits)}
    return {s: f for s, f in frames.items() if len(f)}


def fold_auc(frames):
    """Mean AUC over the folds."""
    aucs = [rank_auc(f["label"].to_numpy().astype(int), f["prob_malignant"].to_numpy(float)) for f in frames.values()]
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else np.nan


def drawn_fold_aucs(frames, weights):
    """Mean AUC over the folds of each resample (rows of each fold's unit weights)."""
    aucs = np.column_stack([weighted_auc(f["label"].to_numpy().astype(int), f["prob_malignant"].to_numpy(float),
                                         weights[s]) for s, f in frames.items()])
    finite = np.isfinite(aucs).any(1)
    return np.where(finite, np.nanmean(np.where(finite[:, None], aucs, 0), axis=1), np.nan)


def inflation(image, patient, n_boot, seed):
    """Image-level minus patient-wise fold-mean AUC and its percentile CI; each side's test units resampled within
    its folds, a patient's units together."""
    gain = fold_auc(image) - fold_auc(patient)
    if not n_boot:
        return gain, np.nan, np.nan
    frames = {("image", s): f for s, f in image.items()} | {("patient", s): f for s, f in patient.items()}
    draw = {k: resampler(len(f), f["patient_id"].map(real_patient).to_numpy()) for k, f in frames.items()}
    weights = drawn_weights(draw, n_boot, seed)
    side = lambda name: drawn_fold_aucs({s: f for (n, s), f in frames.items() if n == name},  # noqa: E731
                                        {s: w for (n, s), w in weights.items() if n == name})
    low, high = percentile_ci(side("image") - side("patient"))
    return gain, low, high


def side_row(name, protocol, level, splits, frames, rule):
    pooled = pd.concat(frames.values(), ignore_index=True)
    aucs = [fold_auc({s: f}) for s, f in frames.items()]
    counts = [also_trained(splits[s]) for s in frames]
    correct = (pooled["prob_malignant"] >= pooled["thr"]).astype(int) == pooled["label"]
    return dict(model=name, protocol=protocol, level=level, threshold_rule=rule, n_folds=len(frames),
                n_test_units=len(pooled), test_patients_per_fold=float(np.mean([c[1] for c in counts])),
                also_trained_per_fold=float(np.mean([c[0] for c in counts])), auc_mean=float(np.nanmean(aucs)),
                auc_std=float(np.nanstd(aucs, ddof=1)) if len(aucs) > 1 else np.nan,
                accuracy=float(correct.mean()))


def model_rows(name, image_splits, patient_splits, rule, n_boot, seed):
    rows = []
    for level in LEVELS:
        image, patient = fold_frames(image_splits, level, rule), fold_frames(patient_splits, level, rule)
        if not image:
            continue
        row = side_row(name, "image_level", level, image_splits, image, rule)
        gain, low, high = inflation(image, patient, n_boot, seed) if patient else (np.nan, np.nan, np.nan)
        rows.append(dict(row, auc_inflation=gain, auc_inflation_ci_low=low, auc_inflation_ci_high=high))
        if patient:
            rows.append(side_row(name, "patient_wise", level, patient_splits, patient, rule))
    return rows


def protocol_table(cfg, book):
    rows = []
    for name in RUNS:
        image = protocol_runs(cfg, name)
        if not image:
            continue
        patient = book.runs.get(name, {})
        if not cv_splits(patient):
            book.notes.append(f"table 9: {name} has no patient-wise CV run beside its image-level one; train it: "
                              f"python main.py --stages {'cv' if name == RUNS[0] else 'baselines'}")
        rows += model_rows(name, image, patient, book.rule, book.bootstrap, book.seed)
    return pd.DataFrame(rows)


def protocol_paper(table, end=""):
    if table.empty:
        return None
    rows = []
    for r in table.to_dict("records"):
        gain = r.get("auc_inflation", np.nan)
        inflated = with_ci(gain, r["auc_inflation_ci_low"], r["auc_inflation_ci_high"], sign=True) \
            if np.isfinite(gain) else ""
        rows.append(([r["model"], r["protocol"].replace("_", "-"), r["level"], mean_std(r["auc_mean"], r["auc_std"]),
                      num(r["accuracy"]), inflated, num(r["also_trained_per_fold"], 1),
                      num(r["test_patients_per_fold"], 1)], {}))
    out = PaperTable("table_9", "Table 9", "Protocol inflation, not a result: the same models and settings trained "
                     "and tested under an image-level random split of the images into folds (the common BreakHis "
                     "protocol: a patient's images on both sides) and under the patient-wise CV of tables 1 and 4. "
                     "AUC mean ± SD over the folds, accuracy at each fold's threshold, the image-level minus "
                     "patient-wise AUC with a 95 % bootstrap CI (each side's test patients resampled), and per fold "
                     f"the test patients who also had images in training.{end}",
                     ["Model", "Split", "Level", "AUC", "Accuracy", "Inflation (ΔAUC)", "Test patients also trained",
                      "Test patients"])
    return assemble(out, rows)
