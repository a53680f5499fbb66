"""Scoring in one place: predictions (tuple and patient rows) -> thresholds and every metric, with patient CIs."""
from pathlib import Path

import numpy as np
import pandas as pd

from utils.helpers import PipelineError, RunFiles, read_json, read_json_or_none
from utils.metrics import (binary_metrics, bootstrap_ci, key_metric, patient_level, safe_auc, sensitivity_threshold,
                           subtype_metrics, youden_threshold)

LEVELS = ("tuple", "patient")
BINARY = ["accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auc"]
KEY = ["accuracy", "balanced_accuracy", "f1", "auc"]
SUBTYPE = ["subtype_macro_f1", "subtype_micro_f1", "subtype_balanced_accuracy"]
BLOCKS = {"fixed_0.5": "t0.5", "val_youden": "youden", "val_sens95": "sens95", "oof_youden": "oof_youden"}
RULES = tuple(BLOCKS)
IMAGE_FOLD = "~"
DECISION_RULES = ("fixed_0.5", "val_youden", "oof_youden")
ROLES = ("train", "val")


def fitted_thresholds(frame):
    """Youden's J and the sensitivity >= 0.95 threshold of one level's validation rows (tuples, or patient means):
    each decides the units it was fitted on."""
    y, p = frame["label"].to_numpy(), frame["prob_malignant"].to_numpy()
    return dict(youden=youden_threshold(y, p), sens95=sensitivity_threshold(y, p, 0.95))


def level_thresholds(tuples):
    """{level: fitted_thresholds} of held-out tuple predictions (patient_id, label, prob_malignant): on the tuples,
    and on each patient's mean probability."""
    return {"tuple": fitted_thresholds(tuples), "patient": fitted_thresholds(patient_level(tuples))}


def oof_thresholds(tuples):
    """{level: Youden's J} of out-of-fold tuple predictions."""
    return {level: fits["youden"] for level, fits in level_thresholds(tuples).items()}


def threshold_of(thresholds, rule):
    """The threshold of `rule` in one level's thresholds (0.5 for fixed_0.5), None where the run has none."""
    if rule == "fixed_0.5":
        return 0.5
    value = thresholds.get(BLOCKS[rule])
    return None if value is None else float(value)


def union_seen(seens):
    """The patients any of several groups (sources, runs) trained or validated on."""
    return {role: sorted(set().union(*(set(map(str, s.get(role, []))) for s in seens))) for role in ROLES}


def real_patient(pid):
    """The patient behind an id: the image-level protocol (table 9) names a patient's images in image fold k
    PATIENT~k."""
    return str(pid).split(IMAGE_FOLD)[0]


def check_no_leak(sources, test_ids, tag, real=False):
    """Refuse to score test patients that anything behind a run (its own training, a tuning study, a teacher,
    ensemble members) trained or validated on, naming which source saw which patients; `real` compares the patients
    behind the ids, so runs of the image-level protocol are refused."""
    key = real_patient if real else str
    test = set(map(key, test_ids))
    found = []
    for source in sources:
        for role, verb in (("train", "trained on"), ("val", "validated on")):
            ids = sorted(test & set(map(key, source.get(role, []))))
            if ids:
                found.append(f"{source['name']} {verb} {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    if found:
        raise PipelineError(f"{tag}: refusing to score test patients that something behind this run has seen "
                            f"({'; '.join(found)}). Every reported number must rest on patients nothing behind it "
                            f"trained or validated on: retrain it from models and settings that never saw them.")


def run_test_ids(run):
    return set(run["pred"].loc[run["pred"]["role"] == "test", "patient_id"].astype(str))


def check_run(run, tag):
    """The leak guard on a run read back from its folder: its record's sources against its test patients."""
    if run["record"] is None:
        raise PipelineError(f"{tag} has no record.json (trained by an earlier version of the pipeline): retrain it "
                            f"with --force, or report it from a separate --output-dir.")
    if any(IMAGE_FOLD in pid for pid in run_test_ids(run)):
        raise PipelineError(f"{tag} was trained under the image-level protocol (a patient's images on both sides of "
                            f"the split): its numbers belong in table 9 only, read from output/protocol/. Move it "
                            f"out of {Path(run['folder']).parent.parent}.")
    check_no_leak(run["record"]["sources"], run_test_ids(run), tag, real=True)


def class_index(names, classes):
    return np.array([classes.index(n) if n in classes else -1 for n in names])


def binary_block(frame, thresholds):
    """binary_metrics at 0.5 and at each threshold of the frame's level (validation, out of fold)."""
    y, p = frame["label"].to_numpy(), frame["prob_malignant"].to_numpy()
    return {"t0.5": binary_metrics(y, p, 0.5)} | {key: binary_metrics(y, p, thr) for key, thr in thresholds.items()}


def in_order(rule, rules):
    """`rules` with the rule in force first."""
    return [rule] + [r for r in rules if r != rule] if rule in rules else list(rules)


def defined_subtype_metrics(y, pred, classes):
    """subtype_metrics where defined: None under two classes; macro scores NaN when the truth holds one class."""
    if len(classes) < 2:
        return None
    m = subtype_metrics(y, pred, classes)
    if len(set(np.asarray(y).tolist()) & set(range(len(classes)))) < 2:
        m.update(macro_f1=float("nan"), balanced_accuracy=float("nan"))
    return m


def subtype_block(frame, classes, column):
    """Defined subtype metrics of one prediction column (None when the head has fewer than two classes)."""
    return defined_subtype_metrics(class_index(frame["subtype_label"], classes), class_index(frame[column], classes),
                                   classes)


def levels(tuples, patients, fn):
    """fn(frame, level) of the tuple rows and of the patient rows."""
    return {"tuple": fn(tuples, "tuple"), "patient": fn(patients, "patient")}


def patient_rows(tuples, subtype_columns=()):
    """One row per patient: mean malignant probability over its tuples, the most common subtype label, the subtype
    predicted from the mean subtype probabilities."""
    pl = patient_level(tuples)
    at = tuples.groupby("patient_id", sort=True).indices
    pl.insert(0, "role", tuples["role"].iloc[0])
    pl.insert(0, "level", "patient")
    pl["group"] = [" + ".join(sorted(tuples["group"].iloc[at[p]].unique())) for p in pl["patient_id"]]
    pl["tuple_id"] = ""
    pl["subtype_label"] = [tuples["subtype_label"].iloc[at[p]].mode().iloc[0] for p in pl["patient_id"]]
    for column, probs, classes in subtype_columns:
        pl[column] = [classes[probs[at[p]].mean(0).argmax()] for p in pl["patient_id"]] if probs is not None else ""
    return pl.drop(columns="n_tuples")


def load_run(folder):
    """predictions, history, metrics.json and record.json of one run folder."""
    files = RunFiles(folder)
    metrics = read_json(files.metrics)
    return dict(
        folder=folder, pred=pd.read_csv(files.predictions, dtype={"patient_id": str, "group": str}),
        metrics=metrics, record=read_json_or_none(files.record), classes=list(metrics["classes"]),
        cache={}, history=pd.read_csv(files.history) if files.history.exists() else None,
        checkpoint=files.best,
    )


def split_order(name):
    return (name == "fixed", int(name.split("_")[-1]) if name.startswith("fold_") else 0, name)


def load_runs(runs_folder):
    """{run_name: {split_name: run}} for every run folder holding predictions.csv; the leak guard checks each."""
    runs = {}
    for path in sorted(runs_folder.glob("*/*/metrics.json")):
        run = load_run(path.parent)
        check_run(run, f"{path.parent.parent.name}/{path.parent.name}")
        runs.setdefault(path.parent.parent.name, {})[path.parent.name] = run
    return {name: dict(sorted(splits.items(), key=lambda kv: split_order(kv[0]))) for name, splits in runs.items()}


def cv_splits(splits):
    return [s for s in splits if s.startswith("fold_")]


def level_frame(pred, level, role):
    """Rows of one level and role; patient rows are built from the tuples when the file has none."""
    rows = pred[(pred["level"] == level) & (pred["role"] == role)]
    if len(rows) or level == "tuple":
        return rows.reset_index(drop=True)
    tuples = pred[(pred["level"] == "tuple") & (pred["role"] == role)]
    return patient_level(tuples) if len(tuples) else rows


def threshold(run, rule, level):
    """The rule's threshold for one level, as the run fitted it on that level's validation (or out-of-fold) rows;
    None where the run has no such threshold."""
    return threshold_of(run["metrics"]["threshold"][level], rule)


def scored_frame(run, level, rule):
    """Test rows of one level with the rule's threshold for that level in a `thr` column (empty without one)."""
    key = (level, rule)
    if key not in run["cache"]:
        frame = level_frame(run["pred"], level, "test").copy()
        thr = threshold(run, rule, level)
        frame["thr"] = thr
        run["cache"][key] = frame if thr is not None else frame.iloc[:0]
    return run["cache"][key]


def confidence_intervals(frame, n, seed):
    """95 % percentile CIs of the key metrics when patients are resampled."""
    row = {}
    frame = frame[["patient_id", "label", "prob_malignant", "thr"]]
    for name in KEY:
        low, high = bootstrap_ci(frame, key_metric(name), n=n, seed=seed)
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
    return row


def binary_scores(frame):
    """binary_metrics of a test frame at its threshold; pooled folds keep each fold's own threshold."""
    if len(frame) == 0:
        return {}
    y, p = frame["label"].to_numpy().astype(int), frame["prob_malignant"].to_numpy(dtype=float)
    thr = frame["thr"].to_numpy()
    if np.ptp(thr) == 0:
        m = binary_metrics(y, p, float(thr[0]))
        return {k: m[k] for k in BINARY + ["threshold", "n"]}
    m = binary_metrics(y, (p >= thr).astype(float), 0.5)
    m.update(auc=safe_auc(y, p), threshold=float("nan"))
    return {k: m[k] for k in BINARY + ["threshold", "n"]}


def subtype_frame(run, level, role="test"):
    frame = level_frame(run["pred"], level, role)
    if "subtype_label" not in frame or frame["subtype_label"].isna().all():
        return frame.iloc[:0]
    return frame


def subtype_result(run, level, column="subtype_pred"):
    """subtype_metrics of the test rows for one prediction column; None when undefined (no column, < 2 classes)."""
    frame = subtype_frame(run, level)
    classes = run["classes"]
    if column not in frame or frame[column].isna().all() or len(classes) < 2:
        return None
    frame = frame[frame["subtype_label"].isin(classes) & frame[column].isin(classes)]
    index = {c: i for i, c in enumerate(classes)}
    return defined_subtype_metrics(frame["subtype_label"].map(index), frame[column].map(index), classes)


def subtype_summary(run, level):
    """Subtype table columns of the test rows; NaN (n/a) where undefined."""
    m = subtype_result(run, level) or {}
    return dict(subtype_macro_f1=m.get("macro_f1", np.nan), subtype_micro_f1=m.get("micro_f1", np.nan),
                subtype_balanced_accuracy=m.get("balanced_accuracy", np.nan))


def has_rule(splits, rule):
    return all(threshold(run, rule, level) is not None for run in splits.values() for level in LEVELS)


def fold_scores(splits, names, level, rule="val_youden"):
    return pd.DataFrame([binary_scores(scored_frame(splits[s], level, rule)) for s in names])


def pooled_run(splits, names):
    """A run-like dict whose predictions are the concatenated test rows of several splits."""
    first = splits[names[0]]
    pred = pd.concat([splits[s]["pred"][splits[s]["pred"]["role"] == "test"] for s in names], ignore_index=True)
    return dict(pred=pred, classes=first["classes"], metrics={}, record=None, cache={})


def pooled_frames(splits, names, level, rule="val_youden"):
    return pd.concat([scored_frame(splits[s], level, rule) for s in names], ignore_index=True)


def shared_splits(splits, reference):
    """CV folds both runs finished; the fixed split when they share no fold."""
    folds = [s for s in cv_splits(splits) if s in reference]
    if folds:
        return folds
    return ["fixed"] if "fixed" in splits and "fixed" in reference else []
