"""Patient-wise splits: stratified group k-fold with a validation subset per fold, and a fixed 70/15/15 split."""
import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from preprocess.analyze import load_index, stem_of
from utils.helpers import PipelineError, log, require, split_path, splits_dir, tables_dir, warn, write_csv

ROLES = ("train", "val", "test")
SPLIT_COLUMNS = ["patient_id", "label", "role", "n_images", "n_slides", "subtypes"]


def patient_table(index):
    """One row per patient stem: label, image and slide counts, subtypes."""
    table = index.groupby("patient_id").agg(
        label=("label", "first"), n_images=("path", "size"), n_slides=("slide_id", "nunique"),
        subtypes=("subtype", lambda s: "|".join(sorted(set(s))))).reset_index()
    return table.sort_values("patient_id").reset_index(drop=True)


def pick_stratified(patients, fraction, rng):
    """Patient ids holding `fraction` of each class, at least one per class, never the whole class."""
    picked = []
    for label, group in patients.groupby("label"):
        ids = group["patient_id"].to_numpy()
        if len(ids) < 2:
            raise PipelineError(f"only {len(ids)} {'malignant' if label else 'benign'} patient(s) left to split "
                                f"off a validation/test part; the dataset is too small for this split.")
        n = int(np.clip(round(fraction * len(ids)), 1, len(ids) - 1))
        picked += list(rng.permutation(ids)[:n])
    return set(picked)


def with_roles(patients, val, test):
    split = patients.copy()
    split["role"] = "train"
    split.loc[split["patient_id"].isin(val), "role"] = "val"
    split.loc[split["patient_id"].isin(test), "role"] = "test"
    return split[SPLIT_COLUMNS]


def check_class_counts(patients, n_folds, what="the data", flag="--n-folds"):
    counts = patients["label"].value_counts()
    fewest = min(counts.get(0, 0), counts.get(1, 0))
    if fewest < n_folds:
        raise PipelineError(f"{n_folds}-fold CV needs at least {n_folds} patients per class; {what} has "
                            f"{counts.get(0, 0)} benign and {counts.get(1, 0)} malignant patients. "
                            f"Use fewer folds ({flag}).")


def cv_splits(patients, n_folds, val_fraction, seed):
    """fold_k: test = fold k (StratifiedGroupKFold on patients), val = stratified part of the rest."""
    check_class_counts(patients, n_folds)
    kfold = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = kfold.split(patients, patients["label"], groups=patients["patient_id"])
    splits = {}
    for k, (train_idx, test_idx) in enumerate(folds):
        rng = np.random.default_rng([seed, k])
        test = set(patients["patient_id"].iloc[test_idx])
        val = pick_stratified(patients.iloc[train_idx], val_fraction, rng)
        splits[f"fold_{k}"] = with_roles(patients, val, test)
    return splits


def fixed_split(patients, fractions, seed):
    """Stratified patient-wise train/val/test with the given fractions."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise PipelineError(f"--fixed-split needs three fractions summing to 1 (train,val,test), got {fractions}")
    rng = np.random.default_rng([seed, 1000])
    _, f_val, f_test = fractions
    test = pick_stratified(patients, f_test, rng)
    rest = patients[~patients["patient_id"].isin(test)]
    val = pick_stratified(rest, f_val / (1 - f_test), rng)
    return with_roles(patients, val, test)


def inner_splits(split, k, seed, flag="--n-folds"):
    """K splits of one split's train+val patients (StratifiedGroupKFold by patient): part i validates, the rest
    trains, the split's test patients stay test and are never read."""
    seen = split[split["role"] != "test"].reset_index(drop=True)
    check_class_counts(seen, k, "the train+val part of a split", flag)
    kfold = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    out = []
    for _, held in kfold.split(seen, seen["label"], groups=seen["patient_id"]):
        inner = split.copy()
        inner.loc[inner["role"] != "test", "role"] = "train"
        inner.loc[inner["patient_id"].isin(seen["patient_id"].iloc[held]), "role"] = "val"
        out.append(inner)
    return out


def make_splits(patients, n_folds=5, val_fraction=0.15, fractions=(0.70, 0.15, 0.15), seed=42):
    """{'fold_0': df, ..., 'fixed': df, 'member_0': df, ...}, one row per patient with its role; the members are the
    fixed split's train+val patients in n_folds grouped folds (the table 2 ensemble), its test patients kept."""
    splits = cv_splits(patients, n_folds, val_fraction, seed)
    splits["fixed"] = fixed_split(patients, fractions, seed)
    for i, member in enumerate(inner_splits(splits["fixed"], n_folds, seed)):
        splits[f"member_{i}"] = member
    return splits


def check_split(name, split, index):
    """Every patient once, both classes in every role, and no stem (re-derived from slide ids) in two roles."""
    twice = sorted(split.loc[split["patient_id"].duplicated(), "patient_id"])
    if twice:
        raise PipelineError(f"{name}: patient(s) listed twice: {', '.join(twice)}")
    missing = set(index["patient_id"]) ^ set(split["patient_id"])
    if missing:
        raise PipelineError(f"{name}: patients not matching the index: {sorted(missing)[:10]}")
    role_of = dict(zip(split["patient_id"], split["role"]))
    roles = pd.DataFrame({"stem": index["slide_id"].map(stem_of), "role": index["patient_id"].map(role_of)})
    leaks = roles.groupby("stem")["role"].nunique()
    leaks = sorted(leaks[leaks > 1].index)
    if leaks:
        raise PipelineError(f"{name}: patient stem(s) {', '.join(leaks)} appear in more than one partition")
    for role in ROLES:
        labels = set(split.loc[split.role == role, "label"])
        if labels != {0, 1}:
            raise PipelineError(f"{name}: the {role} part lacks a class (labels present: {sorted(labels)})")


def check_folds(splits, index):
    tests = [set(s.loc[s.role == "test", "patient_id"]) for n, s in splits.items() if n.startswith("fold_")]
    if sum(map(len, tests)) != len(set().union(*tests)):
        raise PipelineError("cross-validation test folds overlap")
    if set().union(*tests) != set(index["patient_id"]):
        raise PipelineError("cross-validation test folds do not cover every patient")


def split_summary(splits, index):
    images = index.groupby("patient_id").size()
    rows = []
    for name, split in splits.items():
        for role in ROLES:
            part = split[split.role == role]
            row = dict(split=name, role=role)
            for label, cls in ((0, "benign"), (1, "malignant")):
                ids = part.loc[part.label == label, "patient_id"]
                row[f"{cls}_patients"] = len(ids)
                row[f"{cls}_images"] = int(images.reindex(ids).sum())
            rows.append(row)
    return pd.DataFrame(rows)


def dominant_patients(patients, share=0.25):
    """Warn about patients holding more than `share` of the images: they dominate the tuples of the fold testing them."""
    total = patients["n_images"].sum()
    for row in patients[patients["n_images"] > share * total].itertuples(index=False):
        warn(f"patient {row.patient_id} holds {row.n_images} of {total} images ({row.n_images / total:.0%}); "
             f"tuple-level metrics of the split that tests it mostly measure that one patient, read the patient level")


def member_split_names(cfg):
    return [f"member_{i}" for i in range(cfg.n_folds)]


def split_names(cfg):
    return [f"fold_{k}" for k in range(cfg.n_folds)] + ["fixed"] + member_split_names(cfg)


def cv_split_names(cfg):
    """The folds this run trains on (cfg.folds, or all of them)."""
    folds = cfg.folds or tuple(range(cfg.n_folds))
    bad = [k for k in folds if not 0 <= k < cfg.n_folds]
    if bad:
        raise PipelineError(f"--folds {bad} out of range; folds are 0..{cfg.n_folds - 1}")
    return [f"fold_{k}" for k in folds]


def load_split(cfg, name):
    """One split CSV (patient_id, label, role, ...) as written by the split stage."""
    path = require(split_path(cfg, name), "split")
    return pd.read_csv(path, dtype={"patient_id": str, "subtypes": str}, keep_default_na=False)


def run_split(cfg):
    """Stage: compute, check and save every split, print patients/images per class and role."""
    index = load_index(cfg)
    patients = patient_table(index)
    dominant_patients(patients)
    splits = make_splits(patients, cfg.n_folds, cfg.val_fraction, cfg.fixed_split, cfg.seed)
    for name, split in splits.items():
        check_split(name, split, index)
    check_folds(splits, index)
    for name, split in splits.items():
        write_csv(split, split_path(cfg, name), index=False)
    summary = split_summary(splits, index)
    write_csv(summary, tables_dir(cfg) / "split_summary.csv", index=False)
    log(f"Patient-wise splits ({len(patients)} patients by stem, seed {cfg.seed}) -> {splits_dir(cfg)}")
    log(summary.to_string(index=False))
