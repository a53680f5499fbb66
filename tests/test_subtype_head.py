"""Subtype head: the SMOTE balancing rule on imbalanced-learn, the logistic objective and the refit's outputs."""
from collections import Counter

import numpy as np
import pytest
from imblearn.over_sampling import SMOTE
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info, threadpool_limits

import utils.subtype_head as head
from utils.helpers import PipelineError
from utils.subtype_head import fit_logistic, refit_subtype_head, smote


@pytest.fixture
def skewed():
    """400 samples, 12 features, 4 classes in proportion 60/20/12/8."""
    x, y = make_classification(n_samples=400, n_features=12, n_informative=6, n_classes=4, weights=[0.6, 0.2, 0.12],
                               class_sep=1.0, random_state=0)
    return x, y


@pytest.fixture
def calls(monkeypatch):
    """Records the SMOTE settings and log lines of the module under test."""
    seen = dict(smote=[], log=[])

    class Spy(SMOTE):
        def __init__(self, **kwargs):
            seen["smote"].append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(head, "SMOTE", Spy)
    monkeypatch.setattr(head, "log", seen["log"].append)
    return seen


def test_smote_counts_follow_the_balancing_rule(calls):
    x = np.random.default_rng(0).normal(size=(64, 5))
    y = np.array([0] * 40 + [1] * 20 + [2] * 3 + [3])
    xb, yb = smote(x, y, seed=7)
    assert calls["smote"] == [dict(sampling_strategy={1: 40, 2: 40}, k_neighbors=2, random_state=7)]
    assert Counter(yb.tolist()) == {0: 40, 1: 40, 2: 40, 3: 1}
    assert np.array_equal(xb[:64], x) and np.array_equal(yb[:64], y)
    assert calls["log"] == ["SMOTE: class(es) [3] have one training tuple; left as they are"]


def test_smote_k_is_five_at_most_and_balanced_or_lone_classes_are_not_resampled(calls):
    x = np.random.default_rng(0).normal(size=(41, 3))
    smote(x[:40], np.array([0] * 25 + [1] * 15), seed=0)
    assert calls["smote"][0]["k_neighbors"] == 5
    for y in (np.array([0] * 20 + [1] * 20 + [2]), np.zeros(41, int)):
        xb, yb = smote(x, y, seed=0)
        assert xb is x and yb is y
    assert len(calls["smote"]) == 1


def test_smote_interpolates_between_same_class_neighbours():
    x = np.random.default_rng(1).normal(size=(30, 3))
    y = np.array([0] * 24 + [1] * 6)
    xb, yb = smote(x, y, seed=1, k=2)
    assert (yb[30:] == 1).all() and len(xb) == 48
    ones = x[y == 1]
    d = np.linalg.norm(ones[:, None] - ones[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    a, b = ones[:, None], ones[np.argsort(d, 1)[:, :2]]
    for p in xb[30:]:
        t = ((p - a) * (b - a)).sum(-1, keepdims=True) / ((b - a) ** 2).sum(-1, keepdims=True)
        gap = np.linalg.norm(a + t * (b - a) - p, axis=-1)
        assert ((gap < 1e-9) & (t[..., 0] > -1e-9) & (t[..., 0] < 1 + 1e-9)).any()


def test_smote_is_deterministic_by_seed():
    x = np.random.default_rng(2).normal(size=(50, 4))
    y = np.array([0] * 35 + [1] * 10 + [2] * 5)
    assert np.array_equal(smote(x, y, seed=3)[0], smote(x, y, seed=3)[0])
    assert not np.array_equal(smote(x, y, seed=3)[0], smote(x, y, seed=4)[0])


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logistic_minimises_the_multinomial_objective(n_classes):
    """Zero gradient of mean cross entropy + ||W||^2 / (2n) over every class's weights, also with two classes."""
    x, y = make_classification(n_samples=300, n_features=8, n_informative=5, n_classes=n_classes, random_state=1)
    pipe = fit_logistic(x, y, seed=0, tol=1e-9)
    scaler, model = pipe[0], pipe[-1]
    w, b = model.coef_.T, model.intercept_
    if n_classes == 2:
        w, b = np.hstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    z = scaler.transform(x)
    p = pipe.predict_proba(x)
    assert np.allclose(p, np.exp(z @ w + b) / np.exp(z @ w + b).sum(1, keepdims=True))
    residual = p - np.eye(n_classes)[y]
    assert np.abs(z.T @ residual / len(x) + w / len(x)).max() < 1e-6
    assert np.abs(residual.mean(0)).max() < 1e-6
    assert np.abs(w).max() > 0.1


def test_refit_equals_smote_then_a_scaled_sklearn_logistic_regression(skewed):
    x, y = skewed
    probs, counts = refit_subtype_head(x[:300], y[:300], {"val": x[300:]}, 4, 5)
    top = max(Counter(y[:300].tolist()).values())
    grow = {c: top for c, n in Counter(y[:300].tolist()).items() if n < top}
    xb, yb = SMOTE(sampling_strategy=grow, k_neighbors=5, random_state=5).fit_resample(x[:300], y[:300])
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, tol=1e-4, random_state=5)).fit(xb, yb)
    assert np.allclose(probs["val"], ref.predict_proba(x[300:]), rtol=0, atol=1e-12)
    assert counts["after"] == {c: top for c in range(4)}


def test_refit_subtype_head_returns_probabilities_and_counts(skewed):
    x, y = skewed
    last_first = np.argsort(-y[:300], kind="stable")
    train = x[:300][last_first].astype(np.float32), y[:300][last_first]
    probs, counts = refit_subtype_head(*train, {"val": x[300:], "test": x[:0]}, 4, 0)
    assert probs["val"].shape == (100, 4) and probs["test"].shape == (0, 4)
    assert probs["val"].dtype == np.float64 and np.allclose(probs["val"].sum(1), 1)
    assert (probs["val"].argmax(1) == y[300:]).mean() > 0.5
    assert counts["before"] == dict(sorted(Counter(y[:300].tolist()).items()))
    assert list(counts["before"]) == [0, 1, 2, 3] and list(counts["after"]) == [0, 1, 2, 3]
    assert set(counts["after"].values()) == {max(counts["before"].values())}


def test_refit_is_deterministic_by_seed(skewed):
    x, y = skewed
    run = [refit_subtype_head(x[:300], y[:300], {"val": x[300:]}, 4, s)[0]["val"] for s in (0, 0, 1)]
    assert np.array_equal(run[0], run[1]) and not np.array_equal(run[0], run[2])


def test_absent_classes_get_zero_and_a_single_class_gets_one(skewed):
    x, y = skewed
    keep = y != 1
    proba = refit_subtype_head(x[keep], y[keep], {"all": x}, 5, 0)[0]["all"]
    assert proba.shape == (400, 5)
    assert (proba[:, [1, 4]] == 0).all() and np.allclose(proba.sum(1), 1)
    probs, counts = refit_subtype_head(x[y == 2], y[y == 2], {"all": x}, 4, 0)
    assert (probs["all"][:, 2] == 1).all() and (np.delete(probs["all"], 2, 1) == 0).all()
    assert counts["before"] == counts["after"] == {2: int((y == 2).sum())}


def blas_threads():
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_smote_and_fit_run_on_one_blas_thread(skewed, monkeypatch):
    seen = []

    class Smote(SMOTE):
        def fit_resample(self, x, y):
            seen.append(blas_threads())
            return super().fit_resample(x, y)

    class Logistic(LogisticRegression):
        def fit(self, x, y):
            seen.append(blas_threads())
            return super().fit(x, y)

    monkeypatch.setattr(head, "SMOTE", Smote)
    monkeypatch.setattr(head, "LogisticRegression", Logistic)
    with threadpool_limits(2, user_api="blas"):
        refit_subtype_head(*skewed, {}, 4, 0)
        assert blas_threads() == {2}
    assert seen == [{1}, {1}]


def test_refit_subtype_head_rejects_bad_inputs(skewed):
    x, y = skewed
    with pytest.raises(PipelineError, match=r"labels must lie in 0\.\.2, got 0\.\.3"):
        refit_subtype_head(x, y, {}, 3, 0)
    with pytest.raises(PipelineError, match=r"labels must lie in 0\.\.3, got -1\.\.3"):
        refit_subtype_head(x, np.where(y == 0, -1, y), {}, 4, 0)
    with pytest.raises(PipelineError, match="0 training embeddings for 0 labels"):
        refit_subtype_head(x[:0], y[:0], {}, 4, 0)
    with pytest.raises(PipelineError, match="400 training embeddings for 399 labels"):
        refit_subtype_head(x, y[:-1], {}, 4, 0)
