"""Is a difference real: DeLong's test of two correlated ROC curves, McNemar's test of paired decisions, and the
paired bootstrap CI of an AUC difference."""
import warnings

import numpy as np
from scipy.stats import norm, rankdata
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from utils.metrics import percentile_ci, rank_auc, weighted_auc

EXACT_BELOW = 25  # discordant pairs under which McNemar's test uses the exact binomial distribution


def structural_components(y, scores):
    """AUCs and their covariance of several scores of the same cases (DeLong, in Sun & Xu's midrank form)."""
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = np.apply_along_axis(rankdata, 1, pos)
    ty = np.apply_along_axis(rankdata, 1, neg)
    tz = np.apply_along_axis(rankdata, 1, np.hstack([pos, neg]))
    aucs = (tz[:, :m].sum(1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n
    v01 = 1 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong(y, p_a, p_b):
    """DeLong's test that two scores of the same cases have equal ROC AUC: dict(auc_a, auc_b, diff, z, p)."""
    y = np.asarray(y).astype(int)
    nan = dict(auc_a=np.nan, auc_b=np.nan, diff=np.nan, z=np.nan, p=np.nan)
    if y.sum() < 2 or (1 - y).sum() < 2:
        return nan
    aucs, cov = structural_components(y, np.vstack([p_a, p_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (np.copysign(np.inf, diff), 0.0)
    else:
        z = diff / np.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    return dict(auc_a=float(aucs[0]), auc_b=float(aucs[1]), diff=diff, z=float(z), p=p)


def mcnemar(y, pred_a, pred_b):
    """McNemar's test that two classifiers of the same cases are equally accurate: dict(a_only, b_only, p); exact
    binomial under 25 discordant pairs, else chi-square with continuity correction."""
    y = np.asarray(y).astype(int)
    right_a, right_b = np.asarray(pred_a).astype(int) == y, np.asarray(pred_b).astype(int) == y
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    table = [[int((right_a & right_b).sum()), a_only], [b_only, int((~right_a & ~right_b).sum())]]
    if a_only + b_only == 0:
        return dict(a_only=0, b_only=0, p=1.0)
    exact = a_only + b_only < EXACT_BELOW
    result = sm_mcnemar(table, exact=exact, correction=True)
    return dict(a_only=a_only, b_only=b_only, p=float(min(1.0, result.pvalue)))


def fold_aucs(folds):
    """AUC of each fold's (labels, probabilities)."""
    return np.array([rank_auc(y, p) for y, p in folds.values()])


def resampler(n, groups):
    """Draw how often each of n units is picked when n units are drawn with replacement, or when whole groups (e.g. a
    patient's tuples) are drawn, as many as there are."""
    if groups is None:
        return lambda rng: np.bincount(rng.integers(0, n, n), minlength=n)
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    size = codes.max() + 1
    return lambda rng: np.bincount(rng.integers(0, size, size), minlength=size)[codes]


def drawn_weights(draw, n, seed):
    """{key: n x units weights}: n resamples, each drawing every key's units in turn (`draw[key](rng)`, resampler)."""
    rng = np.random.default_rng(seed)
    rows = [[draw[k](rng) for k in draw] for _ in range(n)]
    return {k: np.array([r[j] for r in rows], dtype=float) if n else np.empty((0, 0)) for j, k in enumerate(draw)}


def paired_auc_gain(a, b, n=1000, seed=0, groups=None, alpha=0.05):
    """Fold-mean AUC of a minus b and its percentile CI; within each fold one resample of the test units (or of their
    groups) serves both models. a, b: {fold: (labels, probabilities)} on the same units in the same order."""
    folds = sorted(set(a) & set(b))
    gain = np.nanmean(fold_aucs({f: a[f] for f in folds})) - np.nanmean(fold_aucs({f: b[f] for f in folds}))
    draw = {f: resampler(len(a[f][0]), None if groups is None else groups[f]) for f in folds}
    weights = drawn_weights(draw, n, seed)
    diffs = np.column_stack([weighted_auc(a[f][0], a[f][1], weights[f]) - weighted_auc(b[f][0], b[f][1], weights[f])
                             for f in folds]) if folds and n else np.full((n, 1), np.nan)
    finite = np.isfinite(diffs).any(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        draws = np.nanmean(diffs[finite], axis=1)
    low, high = percentile_ci(draws, alpha)
    return float(gain), low, high
