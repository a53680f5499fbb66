"""Fitting the linear-probe baseline (the eva protocol; the model is backbones.LinearProbe): each field's frozen
backbone maps, mean-pooled and standardised, into a logistic regression fit on the training patients, whose C is
chosen by grouped, stratified inner CV over all the split's train+val patients (patient AUC of the pooled out-of-fold
predictions; ties: DEFAULT_C, else the strongest tied regularisation). The chosen C's out-of-fold predictions give the
oof_youden thresholds. A tuple's probability is the mean over its images, a patient's the mean over its tuples, scored
like every other run; the fit becomes the weights of its checkpoint."""
import time

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from backbones import build_model
from stages.training.checkpoint import checkpoint, save
from stages.training.evaluate import score
from stages.training.features import install_backbone
from stages.training.train import TrainState
from utils.helpers import RunFiles, log
from utils.metrics import patient_level, safe_auc
from utils.scoring import oof_thresholds

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


def regression(c, seed):
    return LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)


def subtype_fit(x, subtypes, c, seed):
    """{class index: (coef, intercept)} of a multinomial probe on scaled features; one seen class gets everything."""
    keep = subtypes >= 0
    seen = np.unique(subtypes[keep])
    if len(seen) < 2:
        return {int(seen[0]) if len(seen) else 0: (np.zeros(x.shape[1]), 0.0)}
    model = regression(c, seed).fit(x[keep], subtypes[keep])
    if len(model.classes_) == 2:
        return {int(model.classes_[0]): (np.zeros(x.shape[1]), 0.0),
                int(model.classes_[1]): (model.coef_[0], float(model.intercept_[0]))}
    return {int(k): (model.coef_[i], float(model.intercept_[i])) for i, k in enumerate(model.classes_)}


def softmax_rows(logits):
    logits = logits - logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def fitted_probe(run, x, y, subtypes, c, seed, backbone_state):
    """The LinearProbe model with the scaler and both regressions fit on the training images."""
    scaler = StandardScaler().fit(x)
    scaled = scaler.transform(x)
    binary = regression(c, seed).fit(scaled, y)
    model = build_model(run.model_name, **run.model_kwargs)
    install_backbone(model, backbone_state)
    model.set_weights(scaler.mean_, scaler.scale_, (binary.coef_[0], float(binary.intercept_[0])),
                      subtype_fit(scaled, subtypes, c, seed))
    return model.eval()


def image_outputs(model, pooled):
    """Per-image P(benign, malignant) and subtype probabilities of pooled features, as the model computes them."""
    z = (pooled - model.mean.numpy()) / model.scale.numpy()
    p = 1 / (1 + np.exp(-(z @ model.binary.weight.detach().numpy()[0] + float(model.binary.bias.detach()[0]))))
    sub = softmax_rows(z @ model.subtype.weight.detach().numpy().T + model.subtype.bias.detach().numpy())
    return np.stack([1 - p, p], 1), sub


def role_outputs(run, role, binary, subtype, pooled):
    rows, _ = role_rows(run, role)
    present = (rows >= 0).astype(np.float32)
    n = len(rows)
    return dict(prob=tuple_mean(rows, binary)[:, 1], subtype_prob=tuple_mean(rows, subtype),
                embedding=tuple_mean(rows, pooled).astype(np.float32),
                mag_weights=present / present.sum(1, keepdims=True).clip(1),
                hma_weights=np.full((n, rows.shape[1]), np.nan, dtype=np.float32), loss=float("nan"))


def probe_run(cfg, run, sources):
    """Choose C by inner CV over the train+val patients, fit the probe on the training images, score like any run;
    the fitted model is the run's checkpoint."""
    start = time.time()
    pooled = run.features.values
    x, y, subtypes = training_images(run, pooled)
    c, aucs, oof = choose_c(run, pooled, cfg.inner_folds, cfg.seed)
    model = fitted_probe(run, x, y, subtypes, c, cfg.seed, run.features.backbone_state)
    save(checkpoint(model, run, cfg, 0, float("nan")), RunFiles(run.folder).best)
    binary, subtype = image_outputs(model, pooled)
    log(f"[{run.tag}] linear probe on {len(x)} training images x {x.shape[1]} features (stage(s) "
        f"{','.join(map(str, run.model_kwargs['feature_stage']))}) | inner {cfg.inner_folds}-fold "
        f"out-of-fold patient AUC by C: {', '.join(f'{k:g}: {v:.3f}' for k, v in aucs.items())} -> C={c:g}, "
        f"out-of-fold Youden threshold {oof['patient']:.3f} on patient means")
    res = {role: role_outputs(run, role, binary, subtype, pooled) for role in ("train", "val", "test")}
    state = TrainState(seconds=time.time() - start)
    predictions, metrics = score(cfg, run, res, state, time.time(), sources, oof)
    metrics["probe"] = dict(C=c, oof_auc_by_C={f"{k:g}": v for k, v in aucs.items()}, n_features=int(x.shape[1]))
    return predictions, metrics
