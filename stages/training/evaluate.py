"""Evaluating one trained run: thresholds from validation, tuple and patient predictions, SMOTE subtype head, metrics."""
import time

import numpy as np
import pandas as pd

from stages.training.forward import amp_settings, predict
from utils.scoring import (binary_block, check_no_leak, class_index, levels, patient_rows, seen_patients,
                           subtype_block, validation_thresholds)
from utils.subtype_head import refit_subtype_head


def tuple_predictions(run, role, res, cfg, smote_prob):
    """predictions.csv rows of one role at tuple level."""
    t, classes = run.tuples[role], run.classes
    df = t[["patient_id", "group", "tuple_id", "label", "subtype_label"]].copy()
    df.insert(0, "role", role)
    df.insert(0, "level", "tuple")
    df["prob_malignant"] = res["prob"]
    df["subtype_pred"] = [classes[i] for i in res["subtype_prob"].argmax(1)]
    df["subtype_pred_smote"] = [classes[i] for i in smote_prob.argmax(1)] if smote_prob is not None else ""
    if cfg.tta:
        df["prob_malignant_tta"] = res["prob_tta"]
    for j, m in enumerate(cfg.magnifications):
        df[f"path_{m}"] = t[f"path_{m}"].to_numpy()
        df[f"mask_{m}"] = (t[f"path_{m}"] != "").astype(int).to_numpy()
        df[f"w_{m}"] = res["mag_weights"][:, j]
        df[f"hma_{m}"] = res["hma_weights"][:, j]
    return df


def smote_head(cfg, run, res, device):
    """Subtype head refit on SMOTE-balanced training embeddings: (probabilities per role, class counts)."""
    y = class_index(run.tuples["train"]["subtype_label"], run.classes)
    sets = {role: res[role]["embedding"] for role in ("val", "test")}
    probs, counts = refit_subtype_head(res["train"]["embedding"], y, sets, len(run.classes), cfg.seed, device)
    named = {k: {run.classes[c]: n for c, n in sorted(v.items())} for k, v in counts.items()}
    return probs, named



def role_frames(cfg, run, role, res, smote_probs):
    """Tuple rows and patient rows of one role."""
    t = tuple_predictions(run, role, res[role], cfg, smote_probs.get(role))
    columns = [("subtype_pred", res[role]["subtype_prob"], run.classes),
               ("subtype_pred_smote", smote_probs.get(role), run.classes)]
    p = patient_rows(t, columns, ["prob_malignant_tta"] if cfg.tta else [])
    return t, p


def role_metrics(cfg, run, t, p, thresholds):
    metrics = dict(binary=levels(t, p, lambda f: binary_block(f, thresholds)),
                   subtype=levels(t, p, lambda f: subtype_block(f, run.classes, "subtype_pred")))
    if cfg.tta:
        metrics["tta"] = levels(t, p, lambda f: binary_block(f, thresholds, "prob_malignant_tta"))
    if cfg.smote:
        metrics["subtype_smote"] = levels(t, p, lambda f: subtype_block(f, run.classes, "subtype_pred_smote"))
    return metrics


def evaluate(cfg, model, run, device, state, seen=None, oof=None):
    """Score the best model: thresholds from validation (and `oof`, from inner models), tuple and patient level,
    SMOTE head, TTA."""
    start = time.time()
    dtype, _ = amp_settings(cfg, device)
    roles = ("train", "val", "test") if cfg.smote else ("val", "test")
    bank = run.inputs(model)
    res = {role: predict(model, bank, run.batches[role], device, dtype, tta=cfg.tta and role != "train")
           for role in roles}
    return score(cfg, run, res, device, state, start, seen, oof)


def score(cfg, run, res, device, state, start, seen=None, oof=None):
    """Metrics and prediction rows from per-role outputs (prob, subtype_prob, embedding, mag_weights, hma_weights);
    `seen` (default: this run's train and val patients) must hold no test patient; `oof` is the out-of-fold
    threshold where the run has one."""
    seen = seen or seen_patients(run.tuples)
    check_no_leak(seen, run.tuples["test"]["patient_id"], run.tag)
    smote_probs, counts = smote_head(cfg, run, res, device) if cfg.smote else ({}, None)
    thresholds = validation_thresholds(run.tuples["val"]["label"].to_numpy(), res["val"]["prob"])
    if oof is not None:
        thresholds["oof_youden"] = float(oof)
    frames, metrics = {}, {}
    for role in ("val", "test"):
        frames[role] = role_frames(cfg, run, role, res, smote_probs)
        metrics[role] = role_metrics(cfg, run, *frames[role], thresholds)
    test = metrics["test"]
    summary = dict(
        run=run.name, split=run.split, seed=cfg.seed, model_name=run.model_name, model_kwargs=run.model_kwargs,
        classes=run.classes, threshold=thresholds, test=test["binary"], val=metrics["val"]["binary"],
        subtype=test["subtype"], subtype_smote=test.get("subtype_smote"), smote=counts,
        mag_weights={m: float(np.nanmean(frames["test"][0][f"w_{m}"])) for m in cfg.magnifications},
        best_epoch=state.best_epoch, epochs=len(state.history), train_seconds=state.seconds,
        eval_seconds=time.time() - start, seen_patients=seen,
    )
    if cfg.tta:
        summary["test_tta"] = test["tta"]
    predictions = pd.concat([f for pair in frames.values() for f in pair], ignore_index=True)
    for m in cfg.magnifications:
        predictions[f"mask_{m}"] = predictions[f"mask_{m}"].astype("Int64")
    return predictions, summary

