"""Choices from all the training patients: the probe's C and the out-of-fold threshold from inner grouped CV over the
train+val patients, never from a test patient; the threshold rule in force leads the tables and the console."""
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from tests.conftest import prepared_output


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_root):
    return prepared_output(tmp_path_factory, tiny_root, "choices", epochs=1, inner_folds=3)


def spec(name, model="mmnet"):
    from stages.training.runs import RunSpec
    return RunSpec(name, model, "cv")


def poisoned(cfg, tmp_path, split="fold_0"):
    """A copy of the output folder whose test patients of `split` have their labels flipped."""
    from preprocess.preprocess import load_split
    out = tmp_path / "poisoned"
    shutil.copytree(cfg.output_dir, out, ignore=shutil.ignore_patterns("runs"))
    test = set(load_split(cfg, split).query("role == 'test'")["patient_id"].astype(str))
    for path in [out / "index.csv", out / "splits" / f"{split}.csv"]:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        hit = frame["patient_id"].isin(test)
        frame.loc[hit, "label"] = (1 - frame.loc[hit, "label"].astype(int)).astype(str)
        frame.to_csv(path, index=False)
    return replace(cfg, output_dir=str(out)), test


def choices(metrics):
    thresholds = {f"{level}_{k}": round(v, 6) for level, kept in metrics["threshold"].items() for k, v in kept.items()}
    return thresholds | {"C": metrics.get("probe", {}).get("C")}


def test_the_probe_picks_c_by_inner_cv_and_ignores_the_test_patients(prepared, tmp_path, monkeypatch):
    from stages.training import data, features
    from stages.training.probe import C_GRID
    from stages.training.run import run_one
    metrics = run_one(prepared, spec("linear_probe", "linear_probe"), "fold_0")
    by_c = metrics["probe"]["oof_auc_by_C"]
    assert set(by_c) == {f"{c:g}" for c in C_GRID}
    assert all(0 < metrics["threshold"][level]["oof_youden"] < 1 for level in ("tuple", "patient"))
    assert "oof_youden" in metrics["test"]["patient"]
    cfg, test = poisoned(prepared, tmp_path)
    pooled = features.pooled_features

    def noisy(cfg, bank, device, stage):
        """Test images' features replaced by noise."""
        from preprocess.analyze import load_index
        index = load_index(cfg)
        rows = [bank.row_of[p] for p in index.loc[index["patient_id"].isin(test), "path"] if p in bank.row_of]
        found = pooled(cfg, bank, device, stage)
        values = found.values.copy()
        values[rows] = np.random.default_rng(0).normal(size=values[rows].shape)
        return features.Pooled(values, found.backbone_state)
    monkeypatch.setattr(data, "pooled_features", noisy)
    again = run_one(cfg, spec("linear_probe", "linear_probe"), "fold_0")
    assert again["probe"]["oof_auc_by_C"] == by_c
    assert choices(again) == choices(metrics)
    assert again["test"]["patient"]["t0.5"]["accuracy"] != metrics["test"]["patient"]["t0.5"]["accuracy"]


def test_ties_take_the_stated_default_c():
    from stages.training.probe import DEFAULT_C, pick
    assert pick({1e-3: 1.0, 1e-2: 1.0, 1.0: 1.0}) == DEFAULT_C
    assert pick({1e-3: 0.5, 0.1: 1.0, 1.0: 1.0}) == 0.1
    assert pick({1e-3: float("nan")}) == DEFAULT_C


def test_inner_models_give_an_out_of_fold_threshold_that_no_test_patient_moves(prepared, tmp_path):
    from preprocess.preprocess import load_split
    from stages.training.run import run_one
    from utils.helpers import read_json, run_dir
    from utils.metrics import youden_threshold
    cfg = replace(prepared, threshold_rule="oof_youden")
    metrics = run_one(cfg, spec("inner"), "fold_0")
    split = load_split(cfg, "fold_0")
    oof = pd.concat([pd.read_csv(p, dtype={"patient_id": str})
                     for p in sorted(run_dir(cfg, "inner", "fold_0").glob("inner_*/oof.csv"))])
    assert len(list(run_dir(cfg, "inner", "fold_0").glob("inner_*/oof.csv"))) == 3
    assert sorted(oof["patient_id"].unique()) == sorted(split.query("role != 'test'")["patient_id"])
    assert oof["patient_id"].is_unique is False and not oof.duplicated(["tuple_id"]).any()
    assert metrics["threshold"]["tuple"]["oof_youden"] == pytest.approx(
        youden_threshold(oof["label"].to_numpy(), oof["prob_malignant"].to_numpy()))
    means = oof.groupby("patient_id").agg(label=("label", "max"), prob=("prob_malignant", "mean"))
    assert metrics["threshold"]["patient"]["oof_youden"] == pytest.approx(
        youden_threshold(means["label"].to_numpy(), means["prob"].to_numpy()))
    assert metrics["inner"]["folds"] == 3
    seen = read_json(run_dir(cfg, "inner", "fold_0") / "record.json")["seen_patients"]
    assert set(seen["train"]) == set(split.query("role != 'test'")["patient_id"])
    poison, _ = poisoned(cfg, tmp_path)
    again = run_one(poison, spec("inner"), "fold_0")
    assert choices(again) == choices(metrics)
    assert again["test"]["patient"]["t0.5"]["accuracy"] != metrics["test"]["patient"]["t0.5"]["accuracy"]


def test_the_rule_in_force_leads_tables_and_console(prepared, capsys):
    import main
    from tests.test_pipeline import flags
    from utils.helpers import tables_dir
    args = flags(prepared, "cv,report") + ["--folds", "0", "--epochs", "1", "--inner-folds", "3", "--runs", "mmnet",
                                           "--threshold-rule", "oof_youden"]
    assert main.main(args) == 0
    out = capsys.readouterr().out
    assert "TEST patient AUC" in out and "(oof_youden, t=" in out and "val_youden" in out
    table = pd.read_csv(tables_dir(prepared) / "table_1_cross_validation_k_fold_results.csv")
    assert table["threshold_rule"].iloc[0] == "oof_youden"
    assert set(table["threshold_rule"]) == {"oof_youden", "val_youden", "fixed_0.5"}
