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
    """Accuracy, balanced accuracy, precision, recall (sensitivity), specificity, F1 and ROC-AUC: scikit-learn's
    confusion matrix and AUC, the rest from the counts (six more scikit-learn calls would cost 25 ms a row)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, pred, labels=[0, 1]).ravel())
    recall = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    return dict(
        accuracy=(tp + tn) / len(y) if len(y) else float("nan"),
        balanced_accuracy=(recall + specificity) / 2 if tp + fn and tn + fp else float("nan"),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=recall,
        specificity=specificity,
        f1=2 * tp / (2 * tp + fp + fn) if tp else 0.0,
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


CHUNK = 2_000_000  # resample x row weights held at once


def group_counts(groups, n, seed):
    """(draws x groups: how often each group was drawn in each of n resamples with replacement, each row's group
    code); the same draws as picking the groups one resample at a time."""
    codes, keys = pd.factorize(pd.Series(groups))
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.choice(len(keys), size=len(keys), replace=True), minlength=len(keys))
                       for _ in range(n)]) if n else np.zeros((0, len(keys)), int)
    return counts, codes


def percentile_ci(values, alpha=0.05):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def bootstrap_ci(frame, metric, group="patient_id", n=1000, seed=0, alpha=0.05):
    """Percentile CI of a metric when whole groups (patients) are resampled with replacement. metric(frame, weights)
    scores every resample at once from row weights (resamples x rows: how often the row's group was drawn)."""
    counts, codes = group_counts(frame[group], n, seed)
    step = max(1, CHUNK // max(1, len(frame)))
    values = [metric(frame, counts[i:i + step][:, codes].astype(float)) for i in range(0, n, step)]
    return percentile_ci(np.concatenate(values) if values else [], alpha)


def weighted_auc(y, p, weights):
    """rank_auc of each row of weights (resamples x cases, a case counted as often as its weight): the
    Mann-Whitney count with ties as one half, as mid-ranks give."""
    order = np.argsort(p, kind="stable")
    y, p, weights = np.asarray(y)[order] == 1, np.asarray(p, dtype=float)[order], weights[:, order]
    pos, neg = weights * y, weights * ~y
    below = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(neg, axis=1)], axis=1)
    first, last = np.searchsorted(p, p, side="left"), np.searchsorted(p, p, side="right")
    pairs = (pos * (below[:, first] + 0.5 * (below[:, last] - below[:, first]))).sum(1)
    n1, n0 = pos.sum(1), neg.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n1 > 0) & (n0 > 0), pairs / (n1 * n0), np.nan)


def ratio(hit, among):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(among > 0, hit / among, np.nan)


def rank_auc(y, p):
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def key_metric(name):
    """One key metric of a frame with per-row thresholds (`thr`) for each row of weights, from weighted counts:
    sklearn's per-call checks would make a 1000-resample bootstrap many times slower; tests check both agree."""
    def score(frame, weights):
        y = frame["label"].to_numpy().astype(int)
        p = frame["prob_malignant"].to_numpy(dtype=float)
        if name == "auc":
            return weighted_auc(y, p, weights)
        pred = (p >= frame["thr"].to_numpy(dtype=float)).astype(int)
        n = weights.sum(1)
        if name == "accuracy":
            return ratio(weights @ (pred == y), n)
        tp, fp, fn = (weights @ ((pred == a) & (y == b)) for a, b in ((1, 1), (1, 0), (0, 1)))
        if name == "f1":
            return np.where(tp + fn > 0, ratio(2 * tp, 2 * tp + fp + fn), np.nan)
        tn = n - tp - fp - fn
        return (ratio(tp, tp + fn) + ratio(tn, tn + fp)) / 2
    return score
