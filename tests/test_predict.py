"""The predict stage: new patients scored by the evaluation path, outputs, ensemble, and every bad input named."""
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import main
from config import Config
from stages.training.runs import REFERENCE
from tests.conftest import TEST_SETTINGS
from tests.test_pipeline import flags
from utils.helpers import read_json
from utils.metrics import youden_threshold
from utils.scoring import threshold_of


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_root):
    """One 1-epoch reference run on the fixed split of the tiny tree: (config, its run folder)."""
    out = tmp_path_factory.mktemp("predict") / "output"
    cfg = replace(Config(), **dict(TEST_SETTINGS, data_root=str(tiny_root), output_dir=str(out), epochs=1))
    assert main.main(flags(cfg, "analyze,split,fixed")) == 0
    return cfg, out / "runs" / REFERENCE / "fixed"


def evaluation(run):
    pred = pd.read_csv(run / "predictions.csv", dtype={"patient_id": str})
    return pred[pred["role"] == "test"]


def fixed_test_images(run):
    """A flat folder holding copies of the fixed split's test images."""
    tuples = evaluation(run)
    tuples = tuples[tuples["level"] == "tuple"]
    return sorted({p for c in tuples.filter(like="path_") for p in tuples[c].dropna() if p})


def copy_into(folder, paths):
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, folder)
    return folder


def predict(cfg, inputs, *extra):
    args = ["--stages", "predict", "--input", ",".join(map(str, inputs)), "--output-dir", cfg.output_dir, "--no-amp",
            "--batch-size", "4"]
    return main.main(args + list(extra))


def outputs(cfg, name):
    folder = next((Path(cfg.output_dir) / "predictions").glob(f"{name}_*"))
    patients = pd.read_csv(folder / "patients.csv", dtype={"patient_id": str}, keep_default_na=False)
    images = pd.read_csv(folder / "images.csv", dtype={"patient_id": str})
    return folder, patients, images


def test_probabilities_match_the_fixed_evaluation(trained, tmp_path):
    cfg, run = trained
    cache = sorted((Path(cfg.output_dir) / "cache").iterdir())
    folder = copy_into(tmp_path / "same_patients", fixed_test_images(run))
    assert predict(cfg, [folder]) == 0
    out, patients, images = outputs(cfg, "same_patients")
    expected = evaluation(run).query("level == 'patient'").set_index("patient_id")
    patients = patients.set_index("patient_id")
    assert sorted(patients.index) == sorted(expected.index)
    np.testing.assert_allclose(patients["prob_malignant"], expected.loc[patients.index, "prob_malignant"], atol=1e-5)
    thresholds = read_json(run / "metrics.json")["threshold"]["patient"]
    assert (patients["threshold_rule"] == "fixed_0.5").all() and (patients["threshold"] == 0.5).all()
    assert (patients["decision"].eq("malignant") == (patients["prob_malignant"] >= 0.5)).all()
    high = patients["decision_high_sensitivity"].eq("malignant")
    assert (high == (patients["prob_malignant"] >= thresholds["sens95"])).all()
    assert (patients["true_class"].eq("malignant") == expected.loc[patients.index, "label"].eq(1)).all()
    assert (images["status"] == "scored").all() and len(images) == len(fixed_test_images(run))
    for patient in patients.index:
        assert (out / "overlays" / f"{patient}_gradcam.png").stat().st_size > 5000
    assert sorted((Path(cfg.output_dir) / "cache").iterdir()) == cache


def test_checkpoint_carries_the_patient_thresholds_and_its_decision_rule(trained):
    """Predict decides patients, so the checkpoint carries the thresholds fitted on the validation patients' mean
    probabilities, not on tuples."""
    cfg, run = trained
    ckpt = torch.load(Path(cfg.output_dir) / "models" / "best_model.pth", weights_only=False)
    thresholds = read_json(run / "metrics.json")["threshold"]["patient"]
    assert ckpt["threshold"] == pytest.approx({**thresholds, "decision": 0.5})
    assert ckpt["threshold_rule"] == cfg.threshold_rule == "fixed_0.5"
    assert ckpt["record"] == read_json(run / "record.json")
    pred = pd.read_csv(run / "predictions.csv", dtype={"patient_id": str})
    val = pred.query("level == 'patient' and role == 'val'")
    assert thresholds["youden"] == pytest.approx(youden_threshold(val["label"], val["prob_malignant"]))
    assert threshold_of(thresholds, "val_youden") == pytest.approx(thresholds["youden"])
    assert threshold_of({**thresholds, "oof_youden": 0.7}, "oof_youden") == 0.7
    assert threshold_of(thresholds, "oof_youden") is None


def test_ensemble_averages_the_fold_models(trained, tmp_path):
    cfg, run = trained
    models = Path(cfg.output_dir) / "models"
    ckpt = torch.load(models / "best_model.pth", weights_only=False)
    weights = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() and "running_" not in k else v
               for k, v in ckpt["model"].items()}
    other = dict(ckpt, model=weights, threshold={"youden": 0.3, "sens95": 0.1, "decision": 0.3},
                 threshold_rule="val_youden")
    (models / "checkpoints").mkdir(exist_ok=True)
    torch.save(ckpt, models / "checkpoints" / f"{REFERENCE}_fold_0.pth")
    torch.save(other, models / "checkpoints" / f"{REFERENCE}_fold_1.pth")
    folder = copy_into(tmp_path / "two_models", fixed_test_images(run)[:8])
    single = []
    for k in (0, 1):
        assert predict(cfg, [folder], "--checkpoint", str(models / "checkpoints" / f"{REFERENCE}_fold_{k}.pth")) == 0
        single.append(outputs(cfg, "two_models")[1].set_index("patient_id"))
        shutil.rmtree(outputs(cfg, "two_models")[0])
    assert predict(cfg, [folder], "--ensemble") == 0
    ensemble = outputs(cfg, "two_models")[1].set_index("patient_id")
    assert not np.allclose(single[0]["prob_malignant"], single[1]["prob_malignant"])
    mean = (single[0]["prob_malignant"] + single[1]["prob_malignant"]) / 2
    np.testing.assert_allclose(ensemble["prob_malignant"], mean.loc[ensemble.index], atol=1e-5)
    assert ensemble["threshold"].iloc[0] == pytest.approx((ckpt["threshold"]["decision"] + 0.3) / 2)
    assert ensemble["threshold_rule"].iloc[0] == "mean of fixed_0.5/val_youden"


def test_other_file_names_are_their_own_patients(trained, tmp_path, capsys):
    cfg, run = trained
    image = fixed_test_images(run)[0]
    folder = tmp_path / "unnamed"
    for target in ("scan.png", "200X/scan.png", "elsewhere/scan.png"):
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / target)
    assert predict(cfg, [folder]) == 0
    assert "without a BreakHis name" in capsys.readouterr().out
    _, patients, images = outputs(cfg, "unnamed")
    assert sorted(patients["patient_id"]) == ["scan", "scan~2", "scan~3"]
    assert sorted(images["magnification"]) == ["200X", "40X", "40X"]
    assert (patients["true_class"] == "").all() and patients["prob_malignant"].between(0, 1).all()


def test_bad_files_are_named_and_the_others_scored(trained, tmp_path, capsys):
    cfg, run = trained
    folder = copy_into(tmp_path / "mixed", fixed_test_images(run)[:4])
    (folder / "notes.txt").write_text("not an image")
    (folder / "SOB_B_A-14-1111-40-001.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "nothing_here").mkdir()
    assert predict(cfg, [folder, tmp_path / "nothing_here", tmp_path / "no_such.png"]) == 2
    text = capsys.readouterr().out
    for name in ("notes.txt", "SOB_B_A-14-1111-40-001.png", "nothing_here", "no_such.png"):
        assert name in text
    assert "Traceback" not in text
    _, patients, images = outputs(cfg, "mixed")
    assert len(patients) >= 1 and (images["status"] == "scored").sum() == 4
    assert (images["status"] == "not scored").sum() == 4


@pytest.mark.parametrize("case", ["empty_folder", "only_junk", "missing_input", "no_input"])
def test_nothing_to_score_stops_with_a_message(trained, tmp_path, capsys, case):
    cfg, _ = trained
    folder = tmp_path / case
    if case != "missing_input":
        folder.mkdir()
    if case == "only_junk":
        (folder / "readme.md").write_text("x")
    no_input = ["--stages", "predict", "--output-dir", cfg.output_dir]
    code = main.main(no_input) if case == "no_input" else predict(cfg, [folder])
    text = capsys.readouterr().out
    assert code == 2 and "Traceback" not in text
    assert "--input" in text if case == "no_input" else str(folder) in text


def test_missing_or_old_checkpoint(trained, tmp_path, capsys):
    cfg, run = trained
    folder = copy_into(tmp_path / "ckpt", fixed_test_images(run)[:2])
    assert predict(cfg, [folder], "--checkpoint", str(tmp_path / "nope.pth")) == 2
    assert "--checkpoint" in capsys.readouterr().out
    old = torch.load(Path(cfg.output_dir) / "models" / "best_model.pth", weights_only=False)
    del old["threshold"]
    torch.save(old, tmp_path / "old.pth")
    assert predict(cfg, [folder], "--checkpoint", str(tmp_path / "old.pth")) == 2
    text = capsys.readouterr().out
    assert "threshold" in text and "older version" in text and "Traceback" not in text
    assert predict(cfg, [folder], "--checkpoint", str(tmp_path / "old.pth"), "--ensemble") == 2
    assert "--ensemble" in capsys.readouterr().out
    other = dict(old, threshold={"youden": 0.5, "sens95": 0.5, "decision": 0.5},
                 normalization={"mean": [0.5] * 3, "std": [0.5] * 3})
    torch.save(other, tmp_path / "other.pth")
    assert predict(cfg, [folder], "--checkpoint", str(tmp_path / "other.pth")) == 2
    assert "normalised" in capsys.readouterr().out


def test_predict_runs_only_when_asked():
    assert "predict" not in main.stage_list(Config())
    assert main.stage_list(replace(Config(), input=("new/",))) == ["predict"]
    assert main.stage_list(replace(Config(), stages=("predict", "fixed"))) == ["fixed", "predict"]
