"""Binary and subtype metrics, validation thresholds, patient aggregation, calibration and bootstrap CIs."""
import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn import metrics as skm


def safe_auc(y, p):
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(skm.roc_auc_score(y, p))


def binary_metrics(y, p, threshold=0.5):
    """Accuracy, balanced accuracy, precision, recall (sensitivity), specificity, F1 and ROC-AUC."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return dict(
        accuracy=float(skm.accuracy_score(y, pred)),
        balanced_accuracy=float(skm.balanced_accuracy_score(y, pred)) if len(np.unique(y)) > 1 else float("nan"),
        precision=float(skm.precision_score(y, pred, zero_division=0)),
        recall=float(skm.recall_score(y, pred, zero_division=0)),
        specificity=float(tn / (tn + fp)) if tn + fp else float("nan"),
        f1=float(skm.f1_score(y, pred, zero_division=0)),
        auc=safe_auc(y, p),
        threshold=float(threshold),
        n=int(len(y)),
    )


def youden_threshold(y, p):
    """Threshold maximising sensitivity + specificity - 1 on the ROC curve; 0.5 where no threshold beats chance (one
    class, or J <= 0 everywhere), instead of roc_curve's no-positive point that would call every case benign."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], 1.0)) if tpr[best] > fpr[best] else 0.5


def sensitivity_threshold(y, p, target=0.95):
    """Highest threshold whose sensitivity is at least `target`."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y, p)
    ok = np.flatnonzero(tpr >= target)
    return float(min(thr[ok[0]], 1.0))


def subtype_metrics(y, pred, classes):
    """Per-class precision/recall/F1, macro and micro F1, accuracy and balanced accuracy over class indices."""
    y = np.asarray(y).astype(int)
    pred = np.asarray(pred).astype(int)
    labels = list(range(len(classes)))
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = {
        c: dict(precision=float(prec[i]), recall=float(rec[i]), f1=float(f1[i]), support=int(support[i]))
        for i, c in enumerate(classes)
    }
    present = [i for i in labels if support[i] > 0]
    return dict(
        accuracy=float(skm.accuracy_score(y, pred)),
        balanced_accuracy=float(np.mean(rec[present])) if present else float("nan"),
        macro_f1=float(skm.f1_score(y, pred, labels=present, average="macro", zero_division=0)) if present else float("nan"),
        micro_f1=float(skm.f1_score(y, pred, labels=labels, average="micro", zero_division=0)),
        per_class=per_class,
        n=int(len(y)),
    )


def patient_level(tuples):
    """One row per patient: the mean malignant probability over the patient's tuples."""
    grouped = tuples.groupby("patient_id", sort=True)
    return pd.DataFrame({
        "label": grouped["label"].max(),
        "prob_malignant": grouped["prob_malignant"].mean(),
        "n_tuples": grouped.size(),
    }).reset_index()


def expected_calibration_error(y, p, n_bins=10):
    """ECE with equal-width bins: sum over bins of |accuracy - confidence| weighted by bin size (binary, p = P(y=1))."""
    y = np.asarray(y).astype(float)
    p = np.asarray(p, dtype=float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        inside = bins == b
        if not inside.any():
            continue
        ece += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(ece)


def bootstrap_ci(frame, metric, group="patient_id", n=1000, seed=0, alpha=0.05):
    """Percentile CI of metric(frame) when whole groups (patients) are resampled with replacement."""
    keys = frame[group].unique()
    rows = frame.groupby(group).indices
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        picked = rng.choice(keys, size=len(keys), replace=True)
        values.append(metric(frame.iloc[np.concatenate([rows[k] for k in picked])]))
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def rank_auc(y, p):
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def key_metric(name):
    """One key metric of a frame with per-row thresholds (`thr`), from counts: sklearn's per-call checks make a
    1000-resample bootstrap many times slower; tests check both agree."""
    def score(frame):
        y = frame["label"].to_numpy().astype(int)
        p = frame["prob_malignant"].to_numpy(dtype=float)
        if name == "auc":
            return rank_auc(y, p)
        pred = (p >= frame["thr"].to_numpy(dtype=float)).astype(int)
        if name == "accuracy":
            return float((pred == y).mean())
        tp, fp = int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum())
        fn = int(((pred == 0) & (y == 1)).sum())
        if name == "f1":
            return 2 * tp / (2 * tp + fp + fn) if tp + fn else float("nan")
        tn = len(y) - tp - fp - fn
        if tp + fn == 0 or tn + fp == 0:
            return float("nan")
        return (tp / (tp + fn) + tn / (tn + fp)) / 2
    return score
