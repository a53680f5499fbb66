"""Table 9's image-level protocol: a random split of the images puts patients on both sides, its runs live in their own
folder, and the report's leak guard refuses them anywhere else."""
from pathlib import Path

import pandas as pd
import pytest

import main
from preprocess.analyze import load_index
from stages.training.protocol import both_sides, image_index, image_split
from tests.conftest import prepared_output
from tests.test_pipeline import flags
from utils.helpers import PipelineError
from utils.scoring import check_no_leak, real_patient


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_root):
    return load_index(prepared_output(tmp_path_factory, tiny_root, "protocol"))


def test_image_folds_cover_every_image_once_and_split_patients_across_folds(index):
    images = image_index(index, 5, seed=0)
    assert len(images) == len(index) and (images["path"] == index["path"]).all()
    fold = images["patient_id"].str.rsplit("~", n=1).str[1].astype(int)
    assert set(fold) == set(range(5)) and fold.value_counts().max() - fold.value_counts().min() <= 1
    assert (images["patient_id"].map(real_patient) == index["patient_id"].astype(str)).all()
    spread = images.assign(fold=fold).groupby(index["patient_id"])["fold"].nunique()
    assert (spread > 1).mean() > 0.9


def test_image_level_split_puts_patients_on_both_sides(index):
    images = image_index(index, 5, seed=0)
    split = image_split(images, 2, 0.15, seed=0)
    test = split[split["role"] == "test"]
    assert test["patient_id"].str.endswith("~2").all() and set(split["role"]) == {"train", "val", "test"}
    assert len(both_sides(split)) >= 1
    assert set(split.groupby("role")["label"].nunique()) == {2}


def test_a_patient_gives_as_many_training_tuples_as_under_the_patient_wise_split():
    from config import Config
    from stages.training.protocol import protocol_config
    cfg = Config(output_dir="out", tuples_per_patient=32, n_folds=5)
    pcfg = protocol_config(cfg)
    assert pcfg.tuples_per_patient * (cfg.n_folds - 1) == cfg.tuples_per_patient
    assert pcfg.output_dir == str(Path("out") / "protocol") and pcfg.cache_dir == str(Path("out") / "cache")


def test_the_leak_guard_compares_the_patients_behind_pseudo_ids():
    sources = [dict(name="mmnet/fold_0", train=["13412~1", "22549~0"], val=[])]
    check_no_leak(sources, ["13412~0"], "mmnet/fold_0")
    with pytest.raises(PipelineError, match="13412"):
        check_no_leak(sources, ["13412~0"], "mmnet/fold_0", real=True)


def test_protocol_stage_trains_in_its_own_folder_and_adds_table_9(make_cfg):
    cfg = make_cfg(epochs=1)
    assert main.main(flags(cfg, "analyze,split,cv,protocol,report") + ["--folds", "0"]) == 0
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["mmnet"]
    for run in ("mmnet", "any_mag"):
        pred = pd.read_csv(out / "protocol" / "runs" / run / "fold_0" / "predictions.csv", dtype={"patient_id": str})
        assert pred.loc[pred["role"] == "test", "patient_id"].str.endswith("~0").all()
    t9 = pd.read_csv(out / "tables" / "table_9_split_protocol.csv")
    image = t9[t9["protocol"] == "image_level"]
    assert set(image["model"]) == {"mmnet", "any_mag"} and (image["also_trained_per_fold"] > 0).all()
    patient = t9[t9["protocol"] == "patient_wise"]
    assert set(patient["model"]) == {"mmnet"} and (patient["also_trained_per_fold"] == 0).all()
    assert image.loc[image["model"] == "mmnet", "auc_inflation"].notna().all()
    notes = (out / "tables" / "report_notes.txt").read_text()
    assert "any_mag has no patient-wise CV run" in notes
    assert "Table 9" in (out / "report.html").read_text()
