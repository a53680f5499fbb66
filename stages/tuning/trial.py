"""One tuning trial: the reference model trained on each outer fold's training patients and scored on their inner
validation patients; the outer test patients are dropped before any image is decoded."""
import os
import shutil
import socket
from dataclasses import replace

import numpy as np
import optuna

from backbones import REFERENCE_MODEL, build_model
from preprocess.analyze import subtype_classes
from preprocess.cache import cache_folder
from preprocess.tuples import TrainBatches, eval_batches, eval_tuples, groups, image_bank
from stages.training.data import RunData, make_criterion, model_kwargs, reads_features, split_frames
from stages.training.features import feature_bank
from stages.training.forward import amp_settings, predict
from stages.training.train import fit, validation_row
from stages.tuning.space import suggest
from utils.checks import check_config, resource_errors
from utils.env import resolve_device, seed_everything
from utils.helpers import log, output_path

INNER = ("train", "val")


def tuning_dir(cfg):
    return output_path(cfg, "tuning")


def inner_rows(cfg, splits):
    """The index rows of patients that train or validate in any of `splits` (never a test patient of all of them),
    and per split its train and val rows."""
    index, parts = None, {}
    for name in splits:
        index, frames = split_frames(cfg, name)
        parts[name] = {role: frames[role] for role in INNER}
    seen = set().union(*(set(rows["patient_id"]) for p in parts.values() for rows in p.values()))
    return index[index["patient_id"].isin(seen)], parts


def inner_run(cfg, split, rows, parts, folder):
    """RunData of one outer fold restricted to its training patients: train on train, validate on val."""
    mags = tuple(cfg.magnifications)
    classes = subtype_classes(rows)
    with resource_errors("the image cache", folder=cache_folder(cfg)):
        bank = image_bank(cfg, rows["path"].astype(str).tolist())
    sampler = TrainBatches(parts["train"], mags, bank.row_of, classes, cfg.tuples_per_patient, cfg.batch_size, cfg.seed)
    tuples = {role: eval_tuples(parts[role], mags) for role in INNER}
    batches = {"val": eval_batches(tuples["val"], mags, bank.row_of, classes, cfg.batch_size)}
    features = None
    if reads_features(cfg, REFERENCE_MODEL):
        features = feature_bank(cfg, bank, resolve_device(cfg.device))
    return RunData(name=folder.parent.name, split=split, folder=folder, model_name=REFERENCE_MODEL,
                   model_kwargs=model_kwargs(cfg, REFERENCE_MODEL, len(classes), {}), classes=classes, bank=bank,
                   train_sampler=sampler, tuples=tuples, batches=batches,
                   criterion=make_criterion(cfg, groups(parts["train"], mags), classes), features=features)


def fold_score(cfg, split, rows, parts, folder, report):
    """Validation patient AUC of the weights one fold's training keeps; `report(epoch, auc)` after every epoch."""
    seed_everything(cfg.seed)
    run = inner_run(cfg, split, rows, parts, folder)
    device = resolve_device(cfg.device)
    model = build_model(REFERENCE_MODEL, **run.model_kwargs)
    with resource_errors(f"tuning run {run.tag}", folder=folder):
        fit(cfg, model, run, device, callback=lambda epoch, state: report(epoch, state.history[-1]["val_auc"]))
        res = predict(model, run.inputs(model), run.batches["val"], device, amp_settings(cfg, device)[0])
    return validation_row(run.tuples["val"], res)["val_auc"]


def trial_config(base, values):
    """The base settings with one trial's values, checked like command-line settings."""
    return check_config(replace(base, resume=False, **values))


def pruning_report(trial, done, fold_index, epochs):
    """Reports the running objective (finished folds' scores and this epoch's AUC) and stops a trial the median
    rule prunes."""
    def report(epoch, auc):
        if auc is None or not np.isfinite(auc):
            return
        step = fold_index * epochs + epoch
        trial.report(float(np.mean(done + [auc])), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at fold {fold_index} epoch {epoch} (running AUC below the median)")
    return report


class Objective:
    """Mean inner-validation patient AUC over the outer folds of a trial's settings."""

    def __init__(self, base, space, splits, folder, worker=0):
        self.base, self.space, self.splits, self.folder, self.worker = base, space, splits, folder, worker
        self.rows, self.parts = inner_rows(base, splits)

    def __call__(self, trial):
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        folder = self.folder / f"trial_{trial.number:04d}"
        try:
            return self.score(trial, folder)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            log(f"[tune] trial {trial.number} FAILED ({type(e).__name__}: {e}); the study goes on")
            raise
        finally:
            for checkpoints in folder.glob("*/checkpoints"):
                shutil.rmtree(checkpoints, ignore_errors=True)

    def score(self, trial, folder):
        cfg = trial_config(self.base, suggest(trial, self.space))
        scores = []
        for i, split in enumerate(self.splits):
            report = pruning_report(trial, scores, i, cfg.epochs)
            scores.append(float(fold_score(cfg, split, self.rows, self.parts[split], folder / split, report)))
            trial.set_user_attr(f"auc_{split}", scores[-1])
        return float(np.nanmean(scores))
