"""Subtype head refit on SMOTE-balanced embeddings: imbalanced-learn's SMOTE and scikit-learn's logistic regression."""
from collections import Counter

import numpy as np
from imblearn.over_sampling import SMOTE
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from utils.helpers import PipelineError, log

DTYPE = np.float64
BLAS_THREADS = 1  # more OpenBLAS threads slow the fit ~10x on a busy CPU (tests/benchmarks/bench_subtype_head.py)


def smote_plan(counts: dict[int, int], k: int = 5) -> tuple[dict[int, int], int]:
    """Classes to grow to the largest class, and the k that the smallest of them allows."""
    top = max(counts.values())
    grow = {c: top for c, n in counts.items() if 2 <= n < top}
    single = [c for c, n in counts.items() if n < 2 and n < top]
    if single:
        log(f"SMOTE: class(es) {single} have one training tuple; left as they are")
    if not grow:
        return grow, 0
    return grow, min(k, min(counts[c] for c in grow) - 1)


def smote(x: np.ndarray, y: np.ndarray, seed: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Each class of 2+ samples grown to the largest by SMOTE; the original rows come first."""
    grow, k = smote_plan(Counter(y.tolist()), k)
    if not grow:
        return x, y
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        return SMOTE(sampling_strategy=grow, k_neighbors=k, random_state=seed).fit_resample(x, y)


def fit_logistic(x: np.ndarray, y: np.ndarray, seed: int, solver: str = "lbfgs", tol: float = 1e-4) -> Pipeline:
    """Standardised multinomial logistic regression, C=1 (two classes: sklearn's binomial form of it, C=2)."""
    c = 2.0 if len(np.unique(y)) == 2 else 1.0
    model = LogisticRegression(C=c, solver=solver, max_iter=500, tol=tol, random_state=seed)
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        return make_pipeline(StandardScaler(), model).fit(x, y)


def probabilities(head: Pipeline | None, classes: np.ndarray, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(rows, n_classes) probabilities; classes absent from training get zero, a lone class gets one."""
    proba = np.zeros((len(x), n_classes))
    if head is None:
        proba[:, classes] = 1.0
    elif len(x):
        proba[:, classes] = head.predict_proba(x)
    return proba


def class_counts(y: np.ndarray) -> dict[int, int]:
    return {int(c): n for c, n in sorted(Counter(y.tolist()).items())}


def refit_subtype_head(train_x, train_y, eval_sets: dict, n_classes: int, seed: int) -> tuple[dict, dict]:
    """SMOTE-balance the training embeddings, fit the head, predict every eval set: (probabilities, class counts)."""
    x = np.asarray(train_x, DTYPE)
    y = np.asarray(train_y).astype(np.int64)
    if len(x) == 0 or len(x) != len(y):
        raise PipelineError(f"subtype head: {len(x)} training embeddings for {len(y)} labels; "
                            "both must be the same non-zero number (are the training tuples empty?)")
    if y.min() < 0 or y.max() >= n_classes:
        raise PipelineError(f"subtype head: labels must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}; "
                            "map subtype names with the run's class list")
    xb, yb = smote(x, y, seed)
    classes = np.unique(yb)
    head = fit_logistic(xb, yb, seed) if len(classes) > 1 else None
    probs = {key: probabilities(head, classes, np.asarray(v, DTYPE), n_classes) for key, v in eval_sets.items()}
    return probs, dict(before=class_counts(y), after=class_counts(yb))
