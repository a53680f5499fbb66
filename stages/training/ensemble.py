"""Table 2's ensemble: K reference models trained on K grouped folds of the fixed split's train+val patients (runs
under runs/<reference>_fixed_member/member_k/), their probabilities averaged on the fixed test patients, which none of
them saw. Each member's thresholds are fitted on the validation patients of its own split, which it did not train on,
at each level (the tuples; each patient's mean); the ensemble's threshold of a rule is the members' mean, so it decides
where the members' margins p_k - t_k sum to zero, the rule predict applies to several checkpoints."""
import time

import numpy as np
import pandas as pd

from preprocess.preprocess import member_split_names
from stages.training.checkpoint import load_model
from stages.training.data import prepare_run
from stages.training.evaluate import score
from stages.training.forward import amp_settings, predict
from stages.training.record import derived_record, read_record, write_record
from stages.training.runs import MEMBERS, REFERENCE
from stages.training.train import TrainState
from utils.env import resolve_device
from utils.helpers import RunFiles, log, read_json_or_none, run_dir, write_csv, write_json
from utils.scoring import BLOCKS, LEVELS, level_thresholds, threshold_of

ENSEMBLE = f"{REFERENCE}_fixed_ensemble"
AVERAGED = ("prob", "subtype_prob", "embedding", "mag_weights", "hma_weights")
THRESHOLDS_FROM = "the mean of the members' thresholds, each fitted on its own validation patients (not trained on)"


def member_folders(cfg):
    return [run_dir(cfg, MEMBERS, s) for s in member_split_names(cfg)]


def honest_members(cfg):
    """best.pth of every finished ensemble member (none saw a fixed test patient), or None when one is missing."""
    files = [RunFiles(f) for f in member_folders(cfg)]
    done = all(f.metrics.exists() and f.best.exists() for f in files)
    return [f.best for f in files] if files and done else None


def averaged(outputs):
    return {k: np.mean([o[k] for o in outputs], 0) for k in AVERAGED} | {"loss": float("nan")}


def stacked(outputs):
    return {k: np.concatenate([o[k] for o in outputs]) for k in AVERAGED} | {"loss": float("nan")}


def mean_thresholds(fits):
    """Each level's and rule's mean over the members; oof_youden is the members' Youden, fitted out of fold."""
    means = {level: {rule: float(np.mean([f[level][rule] for f in fits])) for rule in fits[0][level]}
             for level in LEVELS}
    return {level: rules | {"oof_youden": rules["youden"]} for level, rules in means.items()}


def score_members(cfg, folders, own_splits):
    """Predictions, metrics and record of the members in `folders` averaged on the fixed test patients; the validation
    rows are each member's predictions on the validation part of its own split (`own_splits`), which also give its
    thresholds. Refused (the leak guard of score) when anything behind a member trained or validated on a fixed test
    patient."""
    start, device = time.time(), resolve_device(cfg.device)
    run = prepare_run(cfg, ENSEMBLE, "fixed", REFERENCE, {})
    records = [read_record(f) for f in folders]
    dtype, _ = amp_settings(cfg, device)
    test, oof, oof_tuples, fits = [], [], [], []
    for folder, split in zip(folders, own_splits):
        model, _ = load_model(RunFiles(folder).best, device)
        own = prepare_run(cfg, ENSEMBLE, split, REFERENCE, {})
        test.append(predict(model, run.bank, run.batches["test"], device, dtype, tta=cfg.tta))
        oof.append(predict(model, own.bank, own.batches["val"], device, dtype, tta=cfg.tta))
        oof_tuples.append(own.tuples["val"])
        fits.append(level_thresholds(own.tuples["val"].assign(prob_malignant=oof[-1]["prob"])))
    run.tuples = dict(run.tuples, val=pd.concat(oof_tuples, ignore_index=True))
    record = derived_record(ENSEMBLE, "fixed", records, "the mean of the members' probabilities")
    res = {"val": stacked(oof), "test": averaged(test)}
    thresholds = mean_thresholds(fits)
    predictions, metrics = score(cfg, run, res, TrainState(), start, record["sources"], thresholds=thresholds)
    metrics.update(members=[str(RunFiles(f).best) for f in folders], thresholds_from=THRESHOLDS_FROM)
    return predictions, metrics, record


def member_ensemble(cfg):
    """Score the honest ensemble on the fixed split, again whenever a member was retrained; skipped (with a line)
    until every member is trained."""
    folder = run_dir(cfg, ENSEMBLE, "fixed")
    if honest_members(cfg) is None:
        log(f"[{ENSEMBLE}] needs every member run {MEMBERS}/member_0..{cfg.n_folds - 1}; run the 'fixed' stage")
        return
    members = [read_record(f) for f in member_folders(cfg)]
    done = read_record(folder)
    same = done is not None and done["digest"] == derived_record(ENSEMBLE, "fixed", members, "")["digest"]
    files = RunFiles(folder)
    if same and not cfg.force and read_json_or_none(files.metrics) is not None:
        log(f"[{ENSEMBLE}] scored earlier from the same members; reused (--force scores it again)")
        return
    predictions, metrics, record = score_members(cfg, member_folders(cfg), member_split_names(cfg))
    write_csv(predictions, files.predictions, index=False)
    write_json(files.metrics, metrics)
    write_record(folder, record)
    p = metrics["test"]["patient"][BLOCKS[cfg.threshold_rule]]
    thr = threshold_of(metrics["threshold"]["patient"], cfg.threshold_rule) or 0.5
    log(f"[{ENSEMBLE}] {cfg.n_folds} members (none saw a fixed test patient) on the fixed test patients | patient "
        f"AUC {p['auc']:.3f} acc {p['accuracy']:.3f} F1 {p['f1']:.3f} ({cfg.threshold_rule}, t={thr:.2f})")
