"""Subtype head: torch SMOTE and the L-BFGS logistic regression against the scikit-learn reference."""
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from utils.helpers import PipelineError
from utils.subtype_head import fit_logistic, refit_subtype_head, smote


@pytest.fixture
def skewed():
    """400 samples, 12 features, 4 classes in proportion 60/20/12/8."""
    x, y = make_classification(n_samples=400, n_features=12, n_informative=6, n_classes=4, weights=[0.6, 0.2, 0.12],
                               class_sep=1.0, random_state=0)
    return x, y


def test_logistic_matches_sklearn(skewed):
    x, y = skewed
    ref = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-8, max_iter=5000)).fit(x[:300], y[:300])
    head = fit_logistic(x[:300], y[:300], n_classes=4, tol=1e-6)
    want, got = ref.predict_proba(x[300:]), head.predict_proba(x[300:]).numpy()
    assert np.abs(got - want).max() < 1e-3
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.98


def test_logistic_absent_class_gets_zero_and_single_class_predicts_it(skewed):
    x, y = skewed
    keep = y != 1
    proba = fit_logistic(x[keep], y[keep], n_classes=5).predict_proba(x).numpy()
    assert proba.shape == (400, 5)
    assert (proba[:, [1, 4]] == 0).all() and np.allclose(proba.sum(1), 1)
    only = fit_logistic(x[y == 2], y[y == 2], n_classes=4).predict_proba(x).numpy()
    assert (only.argmax(1) == 2).all() and np.allclose(only[:, 2], 1)


def test_smote_counts_follow_the_balancing_rule():
    x = torch.randn(64, 5)
    y = torch.tensor([0] * 40 + [1] * 20 + [2] * 3 + [3])
    xb, yb = smote(x, y, seed=0)
    assert Counter(yb.tolist()) == {0: 40, 1: 40, 2: 40, 3: 1}
    assert torch.equal(xb[:64], x) and torch.equal(yb[:64], y)


def test_smote_interpolates_between_same_class_neighbours():
    x = torch.randn(30, 3)
    y = torch.tensor([0] * 24 + [1] * 6)
    xb, yb = smote(x, y, seed=1, k=2)
    ones = x[y == 1]
    d = torch.cdist(ones, ones).fill_diagonal_(float("inf"))
    near = d.topk(2, largest=False).indices
    for p in xb[30:]:
        a, b = ones[:, None], ones[near]
        t = ((p - a) * (b - a)).sum(-1, keepdim=True) / (b - a).square().sum(-1, keepdim=True)
        gap = (a + t * (b - a) - p).norm(dim=-1)
        on_segment = (gap < 1e-5) & (t.squeeze(-1) > -1e-6) & (t.squeeze(-1) < 1 + 1e-6)
        assert on_segment.any()


def test_smote_is_deterministic_by_seed():
    x = torch.randn(50, 4)
    y = torch.tensor([0] * 35 + [1] * 10 + [2] * 5)
    assert torch.equal(smote(x, y, seed=3)[0], smote(x, y, seed=3)[0])
    assert not torch.equal(smote(x, y, seed=3)[0], smote(x, y, seed=4)[0])


def test_refit_subtype_head_returns_probabilities_and_counts(skewed):
    x, y = skewed
    probs, counts = refit_subtype_head(x[:300].astype(np.float32), y[:300], {"val": x[300:], "test": x[:0]}, 4, 0)
    assert probs["val"].shape == (100, 4) and probs["test"].shape == (0, 4)
    assert isinstance(probs["val"], np.ndarray) and np.allclose(probs["val"].sum(1), 1)
    assert counts["before"] == dict(sorted(Counter(y[:300].tolist()).items()))
    assert set(counts["after"].values()) == {max(counts["before"].values())}


def test_refit_subtype_head_rejects_bad_labels(skewed):
    x, y = skewed
    with pytest.raises(PipelineError, match="labels"):
        refit_subtype_head(x, y, {}, 3, 0)
    with pytest.raises(PipelineError, match="embeddings"):
        refit_subtype_head(x[:0], y[:0], {}, 4, 0)
