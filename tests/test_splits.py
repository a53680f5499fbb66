import pandas as pd
import pytest

from preprocess.analyze import run_analyze, stem_of
from preprocess.preprocess import (check_split, cv_split_names, load_split, make_splits, patient_table, run_split,
                                   split_names)
from utils.helpers import PipelineError, setup_logging, split_path, tables_dir


@pytest.fixture
def analyzed(make_cfg):
    setup_logging()
    cfg = make_cfg()
    run_analyze(cfg)
    return cfg


def roles_per_stem(index, split):
    rows = index.merge(split[["patient_id", "role"]], on="patient_id", how="left")
    return rows.groupby(rows["slide_id"].map(stem_of))["role"].nunique()


def test_splits_are_patient_wise_and_complete(analyzed):
    from preprocess.analyze import load_index
    run_split(analyzed)
    index = load_index(analyzed)
    patients = set(index["patient_id"])
    tests = []
    for name in split_names(analyzed):
        split = load_split(analyzed, name)
        assert list(split.columns[:3]) == ["patient_id", "label", "role"]
        assert split["patient_id"].is_unique and set(split["patient_id"]) == patients
        assert set(split["role"]) == {"train", "val", "test"}
        assert split.groupby("role")["label"].nunique().eq(2).all()
        assert roles_per_stem(index, split).max() == 1
        if name.startswith("fold_"):
            tests.append(set(split.loc[split.role == "test", "patient_id"]))
    assert len(tests) == analyzed.n_folds
    assert sum(map(len, tests)) == len(patients) and set().union(*tests) == patients
    summary = pd.read_csv(tables_dir(analyzed) / "split_summary.csv")
    assert len(summary) == 3 * len(split_names(analyzed))
    assert (summary.benign_patients + summary.malignant_patients).groupby(summary.split).sum().eq(len(patients)).all()


def test_shared_stems_stay_in_one_partition(analyzed):
    from preprocess.analyze import load_index
    run_split(analyzed)
    index = load_index(analyzed)
    per_stem = index.groupby("patient_id").agg(subtypes=("subtype", "nunique"), slides=("slide_id", "nunique"))
    shared = list(per_stem[(per_stem.subtypes > 1) | (per_stem.slides > 1)].index)
    assert len(shared) >= 2
    for name in split_names(analyzed):
        split = load_split(analyzed, name).set_index("patient_id")
        rows = index[index.patient_id.isin(shared)]
        assert rows.groupby("patient_id").apply(lambda g: split.loc[g.name, "role"], include_groups=False).notna().all()
        assert roles_per_stem(rows, split.reset_index()).max() == 1


def read_all(cfg):
    return {n: split_path(cfg, n).read_text() for n in split_names(cfg)}


def test_same_seed_same_csvs_other_seed_different(analyzed, tmp_path):
    from dataclasses import replace
    import shutil
    run_split(analyzed)
    first = read_all(analyzed)
    run_split(analyzed)
    assert read_all(analyzed) == first
    other = replace(analyzed, seed=analyzed.seed + 1, output_dir=str(tmp_path / "other"))
    (tmp_path / "other").mkdir()
    shutil.copy(tmp_path / "output" / "index.csv", tmp_path / "other" / "index.csv")
    run_split(other)
    assert read_all(other) != first


def test_a_stem_in_two_partitions_is_an_error(analyzed):
    from preprocess.analyze import load_index
    index = load_index(analyzed)
    pair = index.groupby("patient_id")["slide_id"].nunique()
    stem = pair[pair > 1].index[0]
    broken = index.copy()
    broken.loc[broken.patient_id == stem, "patient_id"] = broken.loc[broken.patient_id == stem, "slide_id"]
    splits = make_splits(patient_table(broken), n_folds=5, val_fraction=0.15, seed=0)
    slides = sorted(broken.loc[index.patient_id == stem, "patient_id"].unique())
    split = splits["fixed"].copy()
    split.loc[split.patient_id == slides[0], "role"] = "train"
    split.loc[split.patient_id == slides[1], "role"] = "test"
    with pytest.raises(PipelineError, match=stem):
        check_split("fixed", split, broken)
    with pytest.raises(PipelineError, match="twice"):
        check_split("fixed", pd.concat([split, split.iloc[:1]]), broken)


def test_fold_selection_and_missing_inputs(make_cfg):
    cfg = make_cfg(folds=(0, 2))
    assert cv_split_names(cfg) == ["fold_0", "fold_2"]
    assert cv_split_names(make_cfg()) == [f"fold_{k}" for k in range(5)]
    assert split_names(cfg) == [f"fold_{k}" for k in range(5)] + ["fixed"] + [f"member_{i}" for i in range(5)]
    with pytest.raises(PipelineError):
        cv_split_names(make_cfg(folds=(5,)))
    with pytest.raises(PipelineError, match="analyze"):
        run_split(cfg)
    with pytest.raises(PipelineError, match="split"):
        load_split(cfg, "fold_0")


def test_too_few_patients_for_the_folds(analyzed):
    from preprocess.analyze import load_index
    patients = patient_table(load_index(analyzed))
    with pytest.raises(PipelineError, match="--n-folds"):
        make_splits(patients, n_folds=20)
