"""The linear-probe baseline (the eva protocol): each image's frozen backbone feature map, mean-pooled and
standardised, into a logistic regression fit on the training patients, whose C is chosen by grouped, stratified inner
CV over all the split's train+val patients (patient AUC of the pooled out-of-fold predictions; ties: DEFAULT_C, else
the strongest tied regularisation). The chosen C's out-of-fold predictions give the oof_youden thresholds. A tuple's
probability is the mean over its images, a patient's the mean over its tuples, scored like every other run."""
import time

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stages.training.evaluate import score
from stages.training.train import TrainState
from utils.helpers import log
from utils.metrics import patient_level, safe_auc
from utils.scoring import oof_thresholds

NAME = "linear_probe"
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_C = 1e-2


def role_rows(run, role):
    """Cache rows (N, M), -1 where absent, and subtype indices of one role's tuples, in tuple order."""
    rows = np.concatenate([r for r, _, _ in run.batches[role]])
    subtypes = np.concatenate([s for _, _, s in run.batches[role]])
    return rows, subtypes


def unique_images(rows, labels, subtypes):
    """Every image of some tuples once: (cache rows, malignant label, subtype index)."""
    image, first = np.unique(rows[rows >= 0], return_index=True)
    tuple_of = np.nonzero(rows >= 0)[0][first]
    return image, labels[tuple_of], subtypes[tuple_of]


def training_images(run, pooled):
    """Every training image once: (features, malignant label, subtype index)."""
    rows, subtypes = role_rows(run, "train")
    image, labels, subtypes = unique_images(rows, run.tuples["train"]["label"].to_numpy(), subtypes)
    return pooled[image], labels, subtypes


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


def tuple_probs(model, pooled, rows):
    """P(malignant) of each tuple: the mean over its present images, predicting those images only."""
    if not len(rows):
        return np.zeros(0)
    image = np.unique(rows[rows >= 0])
    values = np.zeros((int(image.max()) + 1, 2))
    values[image] = model.predict_proba(pooled[image])
    return tuple_mean(rows, values)[:, 1]


def inner_tuples(run, k, seed):
    """The train+val tuples (cache rows, labels, patient ids) and the inner fold of each tuple's patient."""
    rows = np.concatenate([role_rows(run, r)[0] for r in ("train", "val")])
    tuples = pd.concat([run.tuples[r] for r in ("train", "val")], ignore_index=True)
    patients = tuples.groupby("patient_id", sort=True)["label"].first()
    kfold = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = pd.Series(0, index=patients.index)
    for i, (_, held) in enumerate(kfold.split(patients, patients.to_numpy(), groups=patients.index)):
        fold.iloc[held] = i
    return rows, tuples, fold.loc[tuples["patient_id"]].to_numpy()


def out_of_fold(c, pooled, rows, tuples, fold, seed):
    """Each train+val tuple's probability from the probe fit without its patient's inner fold."""
    labels, none = tuples["label"].to_numpy(), np.zeros(len(tuples), dtype=int)
    prob = np.zeros(len(tuples))
    for i in np.unique(fold):
        image, y, _ = unique_images(rows[fold != i], labels[fold != i], none[fold != i])
        prob[fold == i] = tuple_probs(classifier(c, seed).fit(pooled[image], y), pooled, rows[fold == i])
    return prob


def pick(aucs):
    """The C of best pooled out-of-fold patient AUC; among ties DEFAULT_C, else the strongest regularisation."""
    finite = {c: a for c, a in aucs.items() if np.isfinite(a)}
    if not finite:
        return DEFAULT_C
    best = [c for c, a in finite.items() if a >= max(finite.values()) - 1e-12]
    return DEFAULT_C if DEFAULT_C in best else min(best)


def choose_c(run, pooled, k, seed):
    """(C, every C's pooled out-of-fold patient AUC, the oof_youden threshold at that C) from grouped, stratified
    inner K-fold CV over the split's train+val patients; test patients are never read."""
    rows, tuples, fold = inner_tuples(run, k, seed)
    probs, aucs = {}, {}
    for c in C_GRID:
        probs[c] = out_of_fold(c, pooled, rows, tuples, fold, seed)
        patients = patient_level(tuples.assign(prob_malignant=probs[c]))
        aucs[c] = safe_auc(patients["label"], patients["prob_malignant"])
    c = pick(aucs)
    return c, aucs, oof_thresholds(tuples.assign(prob_malignant=probs[c]))


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


def probe_run(cfg, run, sources):
    """Choose C by inner CV over the train+val patients, fit the probe on the training images, score like any run."""
    start = time.time()
    pooled = run.features.pooled()
    x, y, subtypes = training_images(run, pooled)
    c, aucs, oof = choose_c(run, pooled, cfg.inner_folds, cfg.seed)
    binary = classifier(c, cfg.seed).fit(x, y).predict_proba(pooled)
    subtype = subtype_probs(pooled, x, subtypes, len(run.classes), c, cfg.seed)
    log(f"[{run.tag}] linear probe on {len(x)} training images x {x.shape[1]} features | inner {cfg.inner_folds}-fold "
        f"out-of-fold patient AUC by C: {', '.join(f'{k:g}: {v:.3f}' for k, v in aucs.items())} -> C={c:g}, "
        f"out-of-fold Youden threshold {oof['patient']:.3f} on patient means")
    res = {role: role_outputs(run, role, binary, subtype, pooled) for role in ("train", "val", "test")}
    state = TrainState(seconds=time.time() - start)
    predictions, metrics = score(cfg, run, res, state, time.time(), sources, oof)
    metrics["probe"] = dict(C=c, oof_auc_by_C={f"{k:g}": v for k, v in aucs.items()}, n_features=int(x.shape[1]))
    return predictions, metrics
