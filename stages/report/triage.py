"""Table 6, triage: how many patients a threshold fitted on validation patients for a target sensitivity clears
(predicts benign) on the test patients, and what it misses."""
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from stages.report.paper import PaperTable, assemble, count, with_ci
from utils import plottings as plots
from utils.helpers import num, plots_dir
from utils.metrics import bootstrap_ci, ratio
from utils.scoring import cv_splits, level_frame

TARGETS = (1.0, 0.98)
SHARES = ("sensitivity", "cleared", "benign_cleared", "npv")


def patients(run, role):
    return level_frame(run["pred"], "patient", role)[["patient_id", "label", "prob_malignant"]]


def why_no_threshold(val):
    """'' when the validation patients allow a sensitivity threshold, else the reason."""
    if (val["label"] == 1).sum() == 0:
        return "no malignant validation patient"
    if (val["label"] == 0).sum() == 0:
        return "no benign validation patient"
    return ""


def sensitivity_threshold(y, p, target):
    """The highest threshold at which `prob >= threshold` flags at least `target` of the malignant patients."""
    _, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    return float(thresholds[np.flatnonzero(tpr >= target - 1e-12)[0]])


def flagged(frame):
    return frame["prob_malignant"].to_numpy(float) >= frame["thr"].to_numpy(float)


def share(name):
    """One triage share of a frame with per-patient thresholds (`thr`) for each row of patient weights; NaN where
    its denominator is empty."""
    def score(frame, weights):
        y, cleared = frame["label"].to_numpy().astype(int), ~flagged(frame)
        parts = {"sensitivity": (~cleared, y == 1), "cleared": (cleared, np.ones(len(y), bool)),
                 "benign_cleared": (cleared, y == 0), "npv": (y == 0, cleared)}
        hit, among = parts[name]
        return ratio(weights @ (hit & among), weights @ among)
    return score


def outcome(frame, n_boot, seed):
    """Test patients' triage at their thresholds, with 95 % patient bootstrap CIs when n_boot > 0."""
    y, cleared = frame["label"].to_numpy().astype(int), ~flagged(frame)
    row = dict(n_patients=len(frame), n_malignant=int(y.sum()), n_benign=int((y == 0).sum()),
               missed_cancers=int((cleared & (y == 1)).sum()), n_cleared=int(cleared.sum()))
    for name in SHARES:
        row[name] = float(share(name)(frame, np.ones((1, len(frame))))[0])
        low, high = bootstrap_ci(frame, share(name), n=n_boot, seed=seed) if n_boot else (np.nan, np.nan)
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
    return row


def fitted_split(run, target):
    """(test patients with the threshold fitted on this split's validation patients in `thr`, threshold, reason)."""
    val, test = patients(run, "val"), patients(run, "test")
    why = why_no_threshold(val) if len(val) else "no validation patients"
    if why or test.empty:
        return None, np.nan, why or "no test patients"
    thr = sensitivity_threshold(val["label"].to_numpy().astype(int), val["prob_malignant"].to_numpy(float), target)
    return test.assign(thr=thr), thr, ""


def model_rows(name, splits, target, n_boot, seed):
    """Each CV fold, the folds' test patients pooled (each at its own fold's threshold) and the fixed split."""
    rows, frames, left_out = [], [], []
    base = dict(model=name, target_sensitivity=target)
    for split in cv_splits(splits):
        frame, thr, why = fitted_split(splits[split], target)
        rows.append(dict(base, split=split, folds=split, threshold=thr, note=why and f"n/a: {why}",
                         **(outcome(frame, 0, seed) if frame is not None else {})))
        if frame is None:
            left_out.append(f"{split} ({why})")
        else:
            frames.append(frame)
    if frames:
        used = [r["split"] for r in rows if r["note"] == ""]
        note = f"left out: {', '.join(left_out)}" if left_out else ""
        rows.append(dict(base, split="pooled_cv", folds=" ".join(used), threshold=np.nan, note=note,
                         **outcome(pd.concat(frames, ignore_index=True), n_boot, seed)))
    elif left_out:
        rows.append(dict(base, split="pooled_cv", folds="", threshold=np.nan, note=f"n/a: every fold: {'; '.join(left_out)}"))
    if "fixed" in splits:
        frame, thr, why = fitted_split(splits["fixed"], target)
        rows.append(dict(base, split="fixed", folds="fixed", threshold=thr, note=why and f"n/a: {why}",
                         **(outcome(frame, n_boot, seed) if frame is not None else {})))
    return rows


def triage_models(book):
    """MMNet and every table 4 model."""
    return list(dict.fromkeys([book.reference] + book.listed.get("baseline", [])))


def triage_table(book):
    rows = []
    for name in triage_models(book):
        splits = book.runs.get(name)
        if splits is None:
            book.notes.append(f"table 6: {name} has no finished run, skipped.")
            continue
        for target in TARGETS:
            rows += model_rows(name, splits, target, book.bootstrap, book.seed)
    for row in rows:
        if row["note"].startswith("n/a"):
            book.notes.append(f"table 6: {row['model']} {row['split']} at sensitivity {row['target_sensitivity']}: "
                              f"{row['note']}.")
    return pd.DataFrame(rows)


def workload_curves(book):
    """{model: (sensitivity, share of patients cleared)} over every threshold of its pooled CV test patients (else
    its fixed split's)."""
    curves = {}
    for name in triage_models(book):
        splits = book.runs.get(name, {})
        names = cv_splits(splits) or [s for s in splits if s == "fixed"]
        if not names:
            continue
        test = pd.concat([patients(splits[s], "test") for s in names], ignore_index=True)
        y, p = test["label"].to_numpy().astype(int), test["prob_malignant"].to_numpy(float)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
        curves[name] = (tpr, 1 - (tpr * y.sum() + fpr * (len(y) - y.sum())) / len(y))
    return curves


def ci_text(row, name):
    value = float(row.get(name, np.nan))
    if not np.isfinite(value):
        return "n/a"
    return with_ci(value, float(row.get(f"{name}_ci_low", np.nan)), float(row.get(f"{name}_ci_high", np.nan)))


def triage_paper(table, end=""):
    """The pooled CV folds and the fixed split of each model at each target sensitivity."""
    if table.empty:
        return None
    shown = table[table["split"].isin(["pooled_cv", "fixed"])]
    rows = []
    for r in shown.to_dict("records"):
        if str(r["note"]).startswith("n/a"):
            rows.append(([r["model"], r["split"].replace("_", " "), num(r["target_sensitivity"], 2), "",
                          str(r["note"])] + [""] * 4, {}))
            continue
        cells = [r["model"], r["split"].replace("_", " "), num(r["target_sensitivity"], 2), count(r["n_patients"]),
                 ci_text(r, "sensitivity"), count(r["missed_cancers"]), ci_text(r, "cleared"),
                 ci_text(r, "benign_cleared"), ci_text(r, "npv")]
        rows.append((cells, {}))
    folds = sorted({f for f in table.loc[table["split"].str.startswith("fold_"), "split"]})
    out = PaperTable("table_6", "Table 6", "Triage: a patient whose mean probability is below the threshold is "
                     "cleared (predicted benign). Each threshold is the highest at which the model reaches the target "
                     f"sensitivity on its split's validation patients ({len(folds)} CV folds, each at its own "
                     "threshold, test patients pooled; and the fixed split); on the test patients: sensitivity "
                     "reached, missed cancers, the share of all patients and of benign patients cleared and the "
                     "negative predictive value, with 95 % bootstrap CIs over patients. A fold validates on a few "
                     f"patients, so a target met there need not be met on the test patients.{end}",
                     ["Model", "Split", "Target sens.", "Patients", "Sensitivity", "Missed cancers",
                      "Patients cleared", "Benign cleared", "NPV"])
    return assemble(out, rows)


def triage_plot(cfg, book, table):
    """Workload against sensitivity of every model, its pooled-CV operating points marked."""
    curves = workload_curves(book)
    if not curves:
        return None
    rows = table[(table["split"] == "pooled_cv") & table["sensitivity"].notna()] if len(table) else table
    marks = {}
    for r in rows.to_dict("records") if "sensitivity" in rows else []:
        marks.setdefault((r["model"], r["sensitivity"], r["cleared"]), []).append(f"{r['target_sensitivity']:g}")
    points = [(*key, "/".join(labels)) for key, labels in marks.items()]
    return plots.workload(curves, points, "Patients cleared against sensitivity, CV test patients pooled\n"
                          "(points: thresholds fitted on validation patients for the marked target)",
                          plots_dir(cfg) / "triage" / "workload_sensitivity.png")
