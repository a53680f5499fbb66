"""One tuning trial: the reference model trained on each inner split of the study's outer split (the fixed split, or one
CV fold) and scored on that inner split's validation patients; the outer test patients are dropped before any image is
decoded, and weights are kept on a fixed schedule (swa) so the patients that score a trial never chose its weights."""
import os
import shutil
import socket
from dataclasses import asdict, replace

import numpy as np
import optuna

from backbones import REFERENCE_MODEL, build_model, model_config
from preprocess.analyze import subtype_classes
from preprocess.preprocess import inner_splits, load_split, member_split_names
from preprocess.tuples import TrainBatches, eval_batches, eval_tuples, groups
from stages.training.checkpoint import run_bytes
from stages.training.data import RunData, index_bank, make_criterion, run_features, split_frames
from stages.training.forward import amp_settings, predict
from stages.training.train import fit, validation_row
from stages.tuning.space import suggest
from utils.checks import check_config, resource_errors
from utils.env import resolve_device, seed_everything
from utils.helpers import log, output_path

INNER = ("train", "val")


def tuning_dir(cfg, outer="fixed"):
    """output/tuning for the study of the fixed split, output/tuning/fold_k for CV fold k's own study."""
    return output_path(cfg, "tuning") if outer == "fixed" else output_path(cfg, "tuning", outer)


def study_splits(cfg, outer):
    """{name: split} a study tunes on, none reading a test patient of `outer`: for the fixed split its member splits
    (K grouped folds of its train+val patients), for CV fold k --inner-folds grouped folds of that fold's train+val
    patients."""
    if outer == "fixed":
        return {name: load_split(cfg, name) for name in member_split_names(cfg)}
    parts = inner_splits(load_split(cfg, outer), cfg.inner_folds, cfg.seed, "--inner-folds")
    return {f"{outer}_inner_{i}": part for i, part in enumerate(parts)}


def inner_rows(cfg, splits):
    """The index rows of patients that train or validate in any of `splits` (never a test patient of all of them),
    and per split its train and val rows."""
    index, parts = None, {}
    for name, split in splits.items():
        index, frames = split_frames(cfg, name, split)
        parts[name] = {role: frames[role] for role in INNER}
    seen = set().union(*(set(rows["patient_id"]) for p in parts.values() for rows in p.values()))
    return index[index["patient_id"].isin(seen)], parts


def inner_run(cfg, split, rows, parts, folder):
    """RunData of one outer fold restricted to its training patients: train on train, validate on val."""
    mags = tuple(cfg.magnifications)
    classes = subtype_classes(rows)
    settings = model_config(cfg, REFERENCE_MODEL, len(classes))
    bank = index_bank(cfg, rows)
    sampler = TrainBatches(parts["train"], mags, bank.row_of, classes, cfg.tuples_per_patient, cfg.batch_size, cfg.seed,
                           mags)
    tuples = {role: eval_tuples(parts[role], mags, mags) for role in INNER}
    batches = {"val": eval_batches(tuples["val"], mags, bank.row_of, classes, cfg.batch_size)}
    return RunData(name=folder.parent.name, split=split, folder=folder, model_name=REFERENCE_MODEL,
                   model_kwargs=asdict(settings), slots=mags, classes=classes, bank=bank, train_sampler=sampler,
                   tuples=tuples, batches=batches, criterion=make_criterion(cfg, groups(parts["train"], mags, mags),
                                                                            classes),
                   features=run_features(cfg, REFERENCE_MODEL, settings, bank))


def fold_score(cfg, split, rows, parts, folder, report):
    """Validation patient AUC of the weights one fold's training keeps; `report(epoch, auc)` after every epoch."""
    seed_everything(cfg.seed)
    run = inner_run(cfg, split, rows, parts, folder)
    device = resolve_device(cfg.device)
    model = build_model(REFERENCE_MODEL, **run.model_kwargs)
    with resource_errors(f"tuning run {run.tag}", folder=folder, needs_bytes=run_bytes(model)):
        fit(cfg, model, run, device, callback=lambda epoch, state: report(epoch, state.history[-1]["val_auc"]))
        res = predict(model, run.inputs(model), run.batches["val"], device, amp_settings(cfg, device)[0])
    return validation_row(run.tuples["val"], res)["val_auc"]


def trial_config(base, values):
    """The base settings with one trial's values, checked like command-line settings; weights kept by swa."""
    return check_config(replace(base, resume=False, **values, selection="swa"))


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
    """Mean inner-validation patient AUC of a trial's settings over the inner splits of `outer`."""

    def __init__(self, base, space, outer, folder, worker=0):
        self.base, self.space, self.folder, self.worker = base, space, folder, worker
        self.rows, self.parts = inner_rows(base, study_splits(base, outer))
        self.splits = list(self.parts)

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
