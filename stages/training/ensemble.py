"""Table 2's ensemble: K reference models trained on K grouped folds of the fixed split's train+val patients (runs
under runs/<reference>_fixed_member/member_k/), their probabilities averaged on the fixed test patients, which none of
them saw; thresholds from their out-of-fold predictions over the fixed train+val patients. score_checkpoints scores
any averaged checkpoints as a run on the fixed split (the distilled student's teacher)."""
import time
from dataclasses import replace

import numpy as np
import pandas as pd

from preprocess.preprocess import member_split_names
from stages.training.checkpoint import load_model
from stages.training.data import prepare_run
from stages.training.evaluate import score
from stages.training.forward import amp_settings, predict
from stages.training.run import finished
from stages.training.train import TrainState
from stages.training.runs import MEMBERS, REFERENCE
from utils.env import resolve_device
from utils.helpers import log, read_json, read_json_or_none, run_dir, write_csv, write_json
from utils.scoring import BLOCKS, union_seen

ENSEMBLE = f"{REFERENCE}_fixed_ensemble"
AVERAGED = ("prob", "subtype_prob", "embedding", "mag_weights", "hma_weights")
THRESHOLDS_FROM = "out-of-fold predictions of the members over the fixed split's train+val patients"


def member_folders(cfg):
    return [run_dir(cfg, MEMBERS, s) for s in member_split_names(cfg)]


def honest_members(cfg):
    """best.pth of every finished ensemble member (none saw a fixed test patient), or None when one is missing."""
    folders = member_folders(cfg)
    done = all((f / "metrics.json").exists() and (f / "checkpoints" / "best.pth").exists() for f in folders)
    return [f / "checkpoints" / "best.pth" for f in folders] if folders and done else None


def averaged(outputs):
    return {k: np.mean([o[k] for o in outputs], 0) for k in AVERAGED} | {"loss": float("nan")}


def stacked(outputs):
    return {k: np.concatenate([o[k] for o in outputs]) for k in AVERAGED} | {"loss": float("nan")}


def score_members(cfg, folders, own_splits):
    """Predictions and metrics of the members in `folders` averaged on the fixed test patients; each member's
    predictions on the validation part of its own split (`own_splits`) together give the thresholds. Refused (the
    leak guard of score) when a member trained or validated on a fixed test patient."""
    start, device = time.time(), resolve_device(cfg.device)
    run = prepare_run(cfg, ENSEMBLE, "fixed", REFERENCE, {})
    seen = union_seen([read_json(f / "metrics.json")["seen_patients"] for f in folders])
    dtype, _ = amp_settings(cfg, device)
    test, oof, oof_tuples = [], [], []
    for folder, split in zip(folders, own_splits):
        model, _ = load_model(folder / "checkpoints" / "best.pth", device)
        own = prepare_run(cfg, ENSEMBLE, split, REFERENCE, {})
        test.append(predict(model, run.bank, run.batches["test"], device, dtype))
        oof.append(predict(model, own.bank, own.batches["val"], device, dtype))
        oof_tuples.append(own.tuples["val"])
    run = replace(run, tuples=dict(run.tuples, val=pd.concat(oof_tuples, ignore_index=True)))
    res = {"val": stacked(oof), "test": averaged(test)}
    predictions, metrics = score(replace(cfg, smote=False, tta=False), run, res, device, TrainState(), start, seen)
    metrics["threshold"]["oof_youden"] = metrics["threshold"]["youden"]
    metrics.update(members=[str(f / "checkpoints" / "best.pth") for f in folders], thresholds_from=THRESHOLDS_FROM)
    return predictions, metrics


def member_ensemble(cfg):
    """Score the honest ensemble on the fixed split; skipped (with a line) until every member is trained."""
    folder = run_dir(cfg, ENSEMBLE, "fixed")
    if honest_members(cfg) is None:
        log(f"[{ENSEMBLE}] needs every member run {MEMBERS}/member_0..{cfg.n_folds - 1}; run the 'fixed' stage")
        return
    if finished(cfg, folder, f"{ENSEMBLE}/fixed") is not None:
        return
    predictions, metrics = score_members(cfg, member_folders(cfg), member_split_names(cfg))
    write_csv(predictions, folder / "predictions.csv", index=False)
    write_json(folder / "metrics.json", metrics)
    p = metrics["test"]["patient"][BLOCKS[cfg.threshold_rule]]
    log(f"[{ENSEMBLE}] {cfg.n_folds} members (none saw a fixed test patient) on the fixed test patients | patient "
        f"AUC {p['auc']:.3f} acc {p['accuracy']:.3f} F1 {p['f1']:.3f} ({cfg.threshold_rule})")


def score_checkpoints(cfg, name, paths, what, extra=None):
    """The checkpoints' mean probability on the fixed split's validation and test patients, written and scored as run
    `name` (skipped when finished with the same members); returns its metrics."""
    folder = run_dir(cfg, name, "fixed")
    done = read_json_or_none(folder / "metrics.json")
    if done is not None and not cfg.force and done.get("members") == [str(p) for p in paths]:
        log(f"[{name}/fixed] finished earlier with the same members; skipped (--force reruns it)")
        return done
    start, device = time.time(), resolve_device(cfg.device)
    run = prepare_run(cfg, name, "fixed", REFERENCE, {})
    dtype, _ = amp_settings(cfg, device)
    outputs = {"val": [], "test": []}
    for path in paths:
        model, _ = load_model(path, device)
        for role in outputs:
            outputs[role].append(predict(model, run.bank, run.batches[role], device, dtype))
    res = {role: averaged(o) for role, o in outputs.items()}
    seen = (extra or {}).get("seen_patients")
    predictions, metrics = score(replace(cfg, smote=False, tta=False), run, res, device, TrainState(), start, seen)
    metrics.update(extra or {}, members=[str(p) for p in paths])
    write_csv(predictions, folder / "predictions.csv", index=False)
    write_json(folder / "metrics.json", metrics)
    p = metrics["test"]["patient"][BLOCKS[cfg.threshold_rule]]
    log(f"[{name}] {what} on the fixed test patients | patient AUC {p['auc']:.3f} acc {p['accuracy']:.3f} "
        f"F1 {p['f1']:.3f} ({cfg.threshold_rule})")
    return metrics
