"""Significance: DeLong against the pairwise Mann-Whitney form written out, McNemar on hand-made tables, the paired
bootstrap of an AUC difference."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from utils import stats


def psi(x, y):
    return 1.0 if x > y else 0.5 if x == y else 0.0


def delong_by_loops(y, a, b):
    """DeLong et al. (1988) with explicit loops: per-case placements, their covariances, z and a two-sided p."""
    pos = [i for i in range(len(y)) if y[i] == 1]
    neg = [j for j in range(len(y)) if y[j] == 0]
    m, n = len(pos), len(neg)
    v10 = [[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in (a, b)]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in (a, b)]
    auc = [sum(v) / m for v in v10]

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mu) * (z - mv) for x, z in zip(u, v)) / (len(u) - 1)

    s10 = [[cov(v10[k], v10[l]) for l in range(2)] for k in range(2)]
    s01 = [[cov(v01[k], v01[l]) for l in range(2)] for k in range(2)]
    var = (s10[0][0] + s10[1][1] - 2 * s10[0][1]) / m + (s01[0][0] + s01[1][1] - 2 * s01[0][1]) / n
    z = (auc[0] - auc[1]) / math.sqrt(var)
    return auc, z, math.erfc(abs(z) / math.sqrt(2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_the_pairwise_form(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(40) < 0.4).astype(int)
    a = np.round(y * 0.8 + rng.normal(0, 0.6, 40), 1)
    b = np.round(y * 0.3 + rng.normal(0, 0.6, 40), 1)
    (auc_a, auc_b), z, p = delong_by_loops(y.tolist(), a.tolist(), b.tolist())
    got = stats.delong(y, a, b)
    assert got["auc_a"] == pytest.approx(roc_auc_score(y, a)) == pytest.approx(auc_a)
    assert got["auc_b"] == pytest.approx(auc_b)
    assert got["z"] == pytest.approx(z, rel=1e-9)
    assert got["p"] == pytest.approx(p, rel=1e-9)
    assert 0 < got["p"] < 1


def test_identical_predictions_give_p_one():
    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 15)
    p = rng.random(30)
    assert stats.delong(y, p, p)["p"] == 1.0
    assert stats.delong(y, p, p)["diff"] == 0.0
    pred = (p > 0.5).astype(int)
    assert stats.mcnemar(y, pred, pred) == dict(a_only=0, b_only=0, p=1.0)


def test_a_clearly_better_score_is_significant_and_the_sign_follows_the_order():
    rng = np.random.default_rng(4)
    y = np.array([0, 1] * 60)
    good, weak = y + rng.normal(0, 0.5, 120), y + rng.normal(0, 3.0, 120)
    forward, backward = stats.delong(y, good, weak), stats.delong(y, weak, good)
    assert forward["p"] < 0.01 and forward["diff"] > 0
    assert backward["p"] == pytest.approx(forward["p"]) and backward["diff"] == pytest.approx(-forward["diff"])


def test_one_class_gives_nan():
    assert math.isnan(stats.delong(np.ones(6), np.arange(6), np.arange(6))["p"])


def cases(both, a_only, b_only, neither):
    """Labels and two classifiers' decisions with the given agreement counts (all labels 1)."""
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return np.ones(len(a), dtype=int), np.array(a), np.array(b)


def test_mcnemar_exact_on_a_hand_made_table():
    got = stats.mcnemar(*cases(20, 10, 2, 5))
    assert (got["a_only"], got["b_only"]) == (10, 2)
    assert got["p"] == pytest.approx(2 * (1 + 12 + 66) / 4096)


def test_mcnemar_chi_square_with_correction_on_a_large_table():
    got = stats.mcnemar(*cases(50, 30, 12, 8))
    statistic = (abs(30 - 12) - 1) ** 2 / (30 + 12)
    assert got["p"] == pytest.approx(math.erfc(math.sqrt(statistic / 2)))


def test_paired_bootstrap_of_the_auc_difference():
    rng = np.random.default_rng(5)
    folds_a, folds_b, groups = {}, {}, {}
    for k in range(3):
        y = np.array([0, 1] * 20)
        folds_a[f"fold_{k}"] = (y, y + rng.normal(0, 0.4, 40))
        folds_b[f"fold_{k}"] = (y, y + rng.normal(0, 2.0, 40))
        groups[f"fold_{k}"] = np.repeat(np.arange(10), 4)
    gain, low, high = stats.paired_auc_gain(folds_a, folds_b, n=300, seed=0)
    expected = np.mean([roc_auc_score(*folds_a[f]) - roc_auc_score(*folds_b[f]) for f in folds_a])
    assert gain == pytest.approx(expected)
    assert 0 < low < gain < high
    assert stats.paired_auc_gain(folds_a, folds_a, n=50, seed=0) == (0.0, 0.0, 0.0)
    clustered = stats.paired_auc_gain(folds_a, folds_b, n=300, seed=0, groups=groups)
    assert clustered[0] == pytest.approx(gain) and clustered[1] < gain < clustered[2]


def test_weighted_bootstrap_scores_equal_the_resampled_rows_scored_by_sklearn():
    """Each resample scored from row weights equals scikit-learn on the rows it drew, repeated, ties included."""
    import pandas as pd
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
    from utils.metrics import group_counts, key_metric
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(dict(patient_id=rng.integers(0, 12, 90).astype(str), label=rng.integers(0, 2, 90),
                              prob_malignant=np.round(rng.random(90), 1), thr=rng.choice([0.3, 0.6], 90)))
    counts, codes = group_counts(frame["patient_id"], 25, seed=1)
    weights = counts[:, codes].astype(float)
    checked = 0
    for w in weights:
        drawn = frame.loc[np.repeat(frame.index, w.astype(int))]
        y, p = drawn["label"].to_numpy(), drawn["prob_malignant"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        pred = (p >= drawn["thr"].to_numpy()).astype(int)
        expected = dict(auc=roc_auc_score(y, p), accuracy=accuracy_score(y, pred), f1=f1_score(y, pred),
                        balanced_accuracy=balanced_accuracy_score(y, pred))
        for name, value in expected.items():
            assert key_metric(name)(frame, w[None])[0] == pytest.approx(value), name
        checked += 1
    assert checked > 20
    assert counts.sum(1).tolist() == [frame["patient_id"].nunique()] * 25
