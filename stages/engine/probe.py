"""The linear-probe baseline (the eva protocol): each image's frozen backbone feature map, mean-pooled and
standardised, into a logistic regression whose C is chosen on the validation patients. A tuple's probability is the
mean over its images, a patient's the mean over its tuples, scored like every other run."""
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stages.engine.evaluate import score
from stages.engine.train import TrainState
from utils.helpers import log
from utils.metrics import patient_level, safe_auc

NAME = "linear_probe"
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def role_rows(run, role):
    """Cache rows (N, M), -1 where absent, and subtype indices of one role's tuples, in tuple order."""
    rows = np.concatenate([r for r, _, _ in run.batches[role]])
    subtypes = np.concatenate([s for _, _, s in run.batches[role]])
    return rows, subtypes


def training_images(run, pooled):
    """Every training image once: (features, malignant label, subtype index)."""
    rows, subtypes = role_rows(run, "train")
    labels = run.tuples["train"]["label"].to_numpy()
    image, first = np.unique(rows[rows >= 0], return_index=True)
    tuple_of = np.nonzero(rows >= 0)[0][first]
    return pooled[image], labels[tuple_of], subtypes[tuple_of]


def tuple_mean(rows, image_values):
    """Mean over each tuple's present images of per-image values (N_images, K) -> (N_tuples, K)."""
    present = rows >= 0
    values = image_values[rows.clip(0)] * present[..., None]
    return values.sum(1) / present.sum(1, keepdims=True).clip(1)


def classifier(c, seed):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced",
                                                              random_state=seed))


def image_probs(model, pooled, rows):
    return tuple_mean(rows, model.predict_proba(pooled)) if len(rows) else np.zeros((0, 2))


def val_auc(run, model, pooled):
    rows, _ = role_rows(run, "val")
    prob = image_probs(model, pooled, rows)[:, 1]
    patients = patient_level(run.tuples["val"].assign(prob_malignant=prob))
    return safe_auc(patients["label"], patients["prob_malignant"])


def choose_c(run, pooled, x, y, seed):
    """The C of best validation patient AUC (ties: the stronger regularisation), with every C's AUC."""
    aucs = {c: val_auc(run, classifier(c, seed).fit(x, y), pooled) for c in C_GRID}
    finite = {c: a for c, a in aucs.items() if np.isfinite(a)}
    return (max(finite, key=lambda c: (finite[c], -c)) if finite else 1.0), aucs


def subtype_probs(pooled, x, subtypes, n_classes, c, seed):
    """Per-image subtype probabilities (N_images, n_classes) from a multinomial probe; one class gets probability 1."""
    seen = np.unique(subtypes[subtypes >= 0])
    out = np.zeros((len(pooled), n_classes))
    if len(seen) < 2:
        out[:, seen[0] if len(seen) else 0] = 1.0
        return out
    keep = subtypes >= 0
    model = classifier(c, seed).fit(x[keep], subtypes[keep])
    out[:, model.classes_] = model.predict_proba(pooled)
    return out


def role_outputs(run, role, binary, subtype, pooled):
    rows, _ = role_rows(run, role)
    present = (rows >= 0).astype(np.float32)
    n = len(rows)
    return dict(prob=tuple_mean(rows, binary)[:, 1], subtype_prob=tuple_mean(rows, subtype),
                embedding=tuple_mean(rows, pooled).astype(np.float32),
                mag_weights=present / present.sum(1, keepdims=True).clip(1),
                hma_weights=np.full((n, rows.shape[1]), np.nan, dtype=np.float32), loss=float("nan"))


def probe_run(cfg, run, device):
    """Fit the probe on the training images, choose C on the validation patients, score like any run."""
    start = time.time()
    pooled = run.features.pooled()
    x, y, subtypes = training_images(run, pooled)
    c, aucs = choose_c(run, pooled, x, y, cfg.seed)
    binary = classifier(c, cfg.seed).fit(x, y).predict_proba(pooled)
    subtype = subtype_probs(pooled, x, subtypes, len(run.classes), c, cfg.seed)
    log(f"[{run.tag}] linear probe on {len(x)} training images x {x.shape[1]} features | validation patient AUC by "
        f"C: {', '.join(f'{k:g}: {v:.3f}' for k, v in aucs.items())} -> C={c:g}")
    res = {role: role_outputs(run, role, binary, subtype, pooled) for role in ("train", "val", "test")}
    state = TrainState(seconds=time.time() - start)
    predictions, metrics = score(cfg, run, res, device, state, time.time())
    metrics["probe"] = dict(C=c, val_auc_by_C={f"{k:g}": v for k, v in aucs.items()}, n_features=int(x.shape[1]))
    return predictions, metrics
