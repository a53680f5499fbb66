"""Table 8, robustness: MMNet's and simple_concat's CV fold models on altered test inputs (robustness.csv of the
robustness stage), each condition's patient AUC and accuracy against the clean input on the same patients, and where
MMNet's CMF puts its weight."""
import numpy as np
import pandas as pd

from stages.training.robustness import RUNS
from stages.training.runs import REFERENCE
from stages.report.paper import PaperTable, assemble, count, with_ci
from utils import plottings as plots
from utils.helpers import RunFiles, mean_std, num, plots_dir
from utils.metrics import safe_auc
from utils.scoring import cv_splits, threshold
from utils.stats import paired_auc_gain

CHANGE = ("auc_change", "accuracy_change")


def fold_frame(run, rule):
    """One fold's robustness.csv with its patient threshold under `rule` (`thr`) and each patient's correctness."""
    path = RunFiles(run["folder"]).robustness
    if not path.exists():
        return None
    thr = threshold(run, rule, "patient")
    frame = pd.read_csv(path, dtype={"patient_id": str})
    correct = (frame["prob_malignant"] >= thr).astype(int) == frame["label"] if thr is not None else np.nan
    return frame.assign(thr=np.nan if thr is None else thr, correct=correct)


def paired(folds, condition):
    """{fold: clean and altered rows of the same patients}, altered columns suffixed _alt."""
    out = {}
    for split, f in folds.items():
        clean, alt = f[f["condition"] == "clean"], f[f["condition"] == condition]
        out[split] = clean.merge(alt, on=["patient_id", "label"], suffixes=("", "_alt"))
    return out


def accuracy_change(pooled, n_boot, seed):
    """Altered minus clean accuracy over the pooled patients and its percentile CI (patients resampled)."""
    diff = (pooled["correct_alt"].astype(float) - pooled["correct"].astype(float)).to_numpy()
    if not len(diff) or np.isnan(diff).any():
        return np.nan, np.nan, np.nan
    if not n_boot:
        return float(diff.mean()), np.nan, np.nan
    draws = diff[np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))].mean(1)
    return float(diff.mean()), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def weight(frame, mag, suffix=""):
    """Mean CMF weight of the slots of `mag` (w_40X, or w_100X_1 ... for repeated slots) over the patients; NaN where
    the model has none."""
    values = frame.filter(regex=rf"^w_{mag}(_\d+)?{suffix}$").to_numpy(float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan


def condition_row(name, folds, condition, rule, n_boot, seed):
    pairs = paired(folds, condition)
    pooled = pd.concat(pairs.values(), ignore_index=True)
    kind, _, mag = condition.partition("_")
    alt = "_alt" if condition != "clean" else ""
    xy = {s: (f["label"].to_numpy().astype(int), f[f"prob_malignant{alt}"].to_numpy(float)) for s, f in pairs.items()}
    clean = {s: (f["label"].to_numpy().astype(int), f["prob_malignant"].to_numpy(float)) for s, f in pairs.items()}
    aucs = [safe_auc(y, p) for y, p in xy.values()]
    row = dict(model=name, condition=condition, kind=kind, magnification=mag, threshold_rule=rule,
               n_folds=len(pairs), n_patients=len(pooled), auc_mean=float(np.nanmean(aucs)),
               auc_std=float(np.nanstd(aucs, ddof=1)) if len(aucs) > 1 else np.nan,
               accuracy=float(pooled[f"correct{alt}"].astype(float).mean()))
    if condition == "clean":
        return dict(row, **{f"{c}{e}": np.nan for c in CHANGE for e in ("", "_ci_low", "_ci_high")},
                    cmf_weight_clean=np.nan, cmf_weight_altered=np.nan)
    gain, low, high = paired_auc_gain(xy, clean, n_boot, seed)
    acc, acc_low, acc_high = accuracy_change(pooled, n_boot, seed)
    fused = name == REFERENCE
    return dict(row, auc_change=gain, auc_change_ci_low=low, auc_change_ci_high=high, accuracy_change=acc,
                accuracy_change_ci_low=acc_low, accuracy_change_ci_high=acc_high,
                cmf_weight_clean=weight(pooled, mag) if fused else np.nan,
                cmf_weight_altered=weight(pooled, mag, "_alt") if fused else np.nan)


def model_rows(name, splits, rule, n_boot, seed, notes):
    folds = {s: fold_frame(splits[s], rule) for s in cv_splits(splits)}
    missing = [s for s, f in folds.items() if f is None]
    if missing:
        notes.append(f"table 8: {name} {', '.join(missing)} have no robustness.csv; run python main.py --stages robustness")
    folds = {s: f for s, f in folds.items() if f is not None}
    if not folds:
        return []
    order = list(dict.fromkeys(next(iter(folds.values()))["condition"]))
    return [condition_row(name, folds, c, rule, n_boot, seed) for c in order]


def robustness_table(book):
    rows = []
    for name in RUNS:
        splits = book.runs.get(name)
        if splits is None:
            book.notes.append(f"table 8: {name} has no finished run, skipped.")
            continue
        rows += model_rows(name, splits, book.rule, book.bootstrap, book.seed, book.notes)
    return pd.DataFrame(rows)


def ci(row, name, sign=True):
    value = row.get(name, np.nan)
    if not np.isfinite(value):
        return ""
    return with_ci(value, row.get(f"{name}_ci_low", np.nan), row.get(f"{name}_ci_high", np.nan), sign=sign)


def weights_text(row):
    clean, altered = row["cmf_weight_clean"], row["cmf_weight_altered"]
    return "" if not np.isfinite(clean) else f"{num(clean, 2)} → {num(altered, 2)}"


def robustness_paper(table, end=""):
    if table.empty:
        return None
    rows = []
    for r in table.to_dict("records"):
        cells = [r["model"], r["condition"].replace("_", " "), count(r["n_patients"]), mean_std(r["auc_mean"],
                 r["auc_std"]), ci(r, "auc_change"), num(r["accuracy"]), ci(r, "accuracy_change"), weights_text(r)]
        rows.append((cells, {}))
    folds = int(table["n_folds"].max())
    out = PaperTable("table_8", "Table 8", "Robustness: each CV fold's trained model on its own test patients with "
                     "one magnification missing (its images dropped, so its slot is masked) or degraded (Gaussian "
                     "blur, JPEG quality 30, a haematoxylin/eosin shift past the training jitter), no retraining. "
                     f"Patient AUC (mean ± SD over {folds} folds), its change against the clean input on the same "
                     "patients (95 % paired bootstrap CI), accuracy at each fold's patient threshold and its change, "
                     "and the mean CMF weight of the altered magnification on clean → altered inputs (MMNet only; "
                     f"a weight that falls means the fusion moved away from the poor input).{end}",
                     ["Model", "Condition", "Patients", "Patient AUC", "ΔAUC", "Accuracy", "ΔAccuracy",
                      "CMF weight"])
    return assemble(out, rows)


def robustness_plot(cfg, table):
    """The AUC change of every condition with its CI, one colour per model."""
    if table.empty or "auc_change" not in table or table["auc_change"].notna().sum() == 0:
        return None
    shown = table[table["condition"] != "clean"]
    return plots.effects(shown, "condition", "auc_change", "model",
                         "Patient AUC change against the clean input, CV test patients (95 % paired CI)",
                         "Patient AUC, altered minus clean", plots_dir(cfg) / "robustness" / "auc_change.png")
