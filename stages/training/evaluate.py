"""Evaluating one trained run: tuple and patient predictions, thresholds from validation at each level, the SMOTE
subtype head, metrics."""
import time

import numpy as np
import pandas as pd

from preprocess.tuples import eval_batches, slot_labels
from stages.training.forward import amp_settings, predict
from utils.scoring import (LEVELS, binary_block, check_no_leak, class_index, fitted_thresholds, levels, patient_rows,
                           subtype_block)
from utils.subtype_head import refit_subtype_head


def tuple_predictions(tuples, res, slots, classes, role, smote_prob=None):
    """predictions.csv rows of one role at tuple level: labels, probabilities, subtype predictions, and per input slot
    (its label: 40X, or 100X_1 ... for repeated slots, or any) the image path, presence mask and magnification weight
    (the explain stage reads the same frame)."""
    df = tuples[["patient_id", "group", "tuple_id", "label", "subtype_label"]].copy()
    df.insert(0, "role", role)
    df.insert(0, "level", "tuple")
    df["prob_malignant"] = res["prob"]
    df["subtype_pred"] = [classes[i] for i in res["subtype_prob"].argmax(1)] if len(classes) else ""
    df["subtype_pred_smote"] = [classes[i] for i in smote_prob.argmax(1)] if smote_prob is not None else ""
    for j, m in enumerate(slot_labels(slots)):
        df[f"path_{m}"] = tuples[f"path_{m}"].to_numpy()
        df[f"mask_{m}"] = (tuples[f"path_{m}"] != "").astype(int).to_numpy()
        df[f"w_{m}"] = res["mag_weights"][:, j]
        df[f"hma_{m}"] = res["hma_weights"][:, j]
    return df


def predict_all(model, tuples, mags, classes, bank, device, batch_size, tta=False):
    """predictions.csv's tuple rows (probability, CMF/HMA weights, masks) of every tuple, through the one prediction
    path (the mean over four views with `tta`, as the threshold was fitted)."""
    batches = eval_batches(tuples, mags, bank.row_of, classes, batch_size)
    return tuple_predictions(tuples, predict(model, bank, batches, device, tta=tta), mags, classes, "test")


def smote_head(cfg, run, res):
    """Subtype head refit on SMOTE-balanced training embeddings: (probabilities per role, class counts)."""
    y = class_index(run.tuples["train"]["subtype_label"], run.classes)
    sets = {role: res[role]["embedding"] for role in ("val", "test")}
    probs, counts = refit_subtype_head(res["train"]["embedding"], y, sets, len(run.classes), cfg.seed)
    named = {k: {run.classes[c]: n for c, n in sorted(v.items())} for k, v in counts.items()}
    return probs, named


def role_frames(cfg, run, role, res, smote_probs):
    """Tuple rows and patient rows (mean probability over the patient's tuples) of one role."""
    t = tuple_predictions(run.tuples[role], res[role], run.slots, run.classes, role, smote_probs.get(role))
    columns = [("subtype_pred", res[role]["subtype_prob"], run.classes),
               ("subtype_pred_smote", smote_probs.get(role), run.classes)]
    return t, patient_rows(t, columns)


def role_metrics(run, t, p, thresholds, smote):
    """Binary metrics of each level at that level's thresholds, and subtype metrics (with SMOTE where refit)."""
    metrics = dict(binary=levels(t, p, lambda f, level: binary_block(f, thresholds[level])),
                   subtype=levels(t, p, lambda f, level: subtype_block(f, run.classes, "subtype_pred")))
    if smote:
        metrics["subtype_smote"] = levels(t, p, lambda f, level: subtype_block(f, run.classes, "subtype_pred_smote"))
    return metrics


def evaluate(cfg, model, run, device, state, sources, oof=None):
    """Score the kept weights on every role (test-time augmentation under --tta, for thresholds and tables alike)."""
    start = time.time()
    dtype, _ = amp_settings(cfg, device)
    roles = ("train", "val", "test") if cfg.smote else ("val", "test")
    bank = run.inputs(model)
    res = {role: predict(model, bank, run.batches[role], device, dtype, tta=cfg.tta and role != "train")
           for role in roles}
    return score(cfg, run, res, state, start, sources, oof)


def score(cfg, run, res, state, start, sources, oof=None, thresholds=None):
    """Metrics and prediction rows from per-role outputs (prob, subtype_prob, embedding, mag_weights, hma_weights).
    Thresholds are fitted at each level on that level's validation rows (tuples; patients' mean probabilities) unless
    given ({level: {rule: threshold}}), and `oof` ({level: threshold}) comes from out-of-fold predictions; each decides
    the units of its own level. Refused when a source behind the run (`sources`) trained or validated on a test
    patient."""
    check_no_leak(sources, run.tuples["test"]["patient_id"], run.tag)
    smote = cfg.smote and "train" in res
    smote_probs, counts = smote_head(cfg, run, res) if smote else ({}, None)
    frames = {role: role_frames(cfg, run, role, res, smote_probs) for role in ("val", "test")}
    thresholds = thresholds or {level: fitted_thresholds(frame) for level, frame in zip(LEVELS, frames["val"])}
    for level, value in (oof or {}).items():
        thresholds[level]["oof_youden"] = float(value)
    metrics = {role: role_metrics(run, *frames[role], thresholds, smote) for role in frames}
    test = metrics["test"]
    summary = dict(
        run=run.name, split=run.split, seed=cfg.seed, model_name=run.model_name, model_kwargs=run.model_kwargs,
        classes=run.classes, threshold=thresholds, test=test["binary"], val=metrics["val"]["binary"],
        subtype=test["subtype"], subtype_smote=test.get("subtype_smote"), smote=counts, tta=cfg.tta,
        mag_weights={m: float(np.nanmean(frames["test"][0][f"w_{m}"])) for m in slot_labels(run.slots)},
        best_epoch=state.best_epoch, epochs=len(state.history), train_seconds=state.seconds,
        eval_seconds=time.time() - start,
    )
    predictions = pd.concat([f for pair in frames.values() for f in pair], ignore_index=True)
    for m in slot_labels(run.slots):
        predictions[f"mask_{m}"] = predictions[f"mask_{m}"].astype("Int64")
    return predictions, summary
