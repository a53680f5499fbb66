"""Protocol stage (on request): MMNet and any_mag trained and tested under the image-level random split most BreakHis
papers use, a patient's images on both sides, in their own folder (output/protocol/), for table 9's measure of how
much that protocol inflates the numbers. A patient's images in image fold k are the pseudo-patient PATIENT~k, so the
patient-wise machinery (tuples, splits, runs) carries the image-level split unchanged."""
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold

from preprocess.analyze import load_index
from preprocess.cache import cache_folder
from preprocess.preprocess import patient_table, pick_stratified
from stages.training.runs import REFERENCE
from stages.training.stage import run_training
from utils.helpers import index_path, log, split_path, write_csv
from utils.scoring import IMAGE_FOLD, real_patient

RUNS = (REFERENCE, "any_mag")
FOLDER = "protocol"


def protocol_config(cfg):
    """The command's settings with output/protocol/ as output folder, the same image cache and only RUNS; a patient's
    n_folds - 1 training pseudo-patients draw tuples_per_patient / (n_folds - 1) tuples each, so a patient gives as
    many training tuples per epoch (and a run as many optimiser steps) as under the patient-wise split."""
    per_patient = math.ceil(cfg.tuples_per_patient / (cfg.n_folds - 1))
    return replace(cfg, output_dir=str(Path(cfg.output_dir) / FOLDER), cache_dir=str(cache_folder(cfg)), runs=RUNS,
                   tuples_per_patient=per_patient)


def image_index(index, n_folds, seed):
    """The index with each image in one of n_folds random image folds, its patient renamed PATIENT~fold."""
    fold = np.empty(len(index), dtype=int)
    for k, (_, test) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(index)):
        fold[test] = k
    return index.assign(patient_id=index["patient_id"].astype(str) + IMAGE_FOLD + fold.astype(str))


def image_split(index, k, val_fraction, seed):
    """Image fold k's split of the pseudo-patients: fold k's images test, a stratified share of the others'
    validate, the rest train."""
    patients = patient_table(index)
    test = patients["patient_id"].str.endswith(f"{IMAGE_FOLD}{k}")
    val = pick_stratified(patients[~test], val_fraction, np.random.default_rng(seed + k))
    role = np.where(test, "test", np.where(patients["patient_id"].isin(val), "val", "train"))
    return patients.assign(role=role)


def both_sides(split):
    """Patients with images among the test images and among the training images."""
    real = split.assign(patient=split["patient_id"].map(real_patient))
    test, train = (set(real.loc[real["role"] == r, "patient"]) for r in ("test", "train"))
    return test & train


def write_protocol(cfg, pcfg):
    index = image_index(load_index(cfg), cfg.n_folds, cfg.seed)
    write_csv(index, index_path(pcfg), index=False)
    for k in range(cfg.n_folds):
        split = image_split(index, k, cfg.val_fraction, cfg.seed)
        write_csv(split, split_path(pcfg, f"fold_{k}"), index=False)
        test = split[split["role"] == "test"]["patient_id"].map(real_patient)
        log(f"image fold {k}: {int(index['patient_id'].isin(split.loc[split.role == 'test', 'patient_id']).sum())} "
            f"test images of {test.nunique()} patients, {len(both_sides(split))} of them also in training")


def run_protocol(cfg):
    """Stage: the image-level split under output/protocol/, then MMNet (cv) and any_mag (baselines) trained on it."""
    pcfg = protocol_config(cfg)
    write_protocol(cfg, pcfg)
    run_training(pcfg, "cv")
    run_training(pcfg, "baselines")
