"""Experiment stages on the tiny synthetic tree: learning, run folders, checkpoints, SMOTE, stage order."""
from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pytest
import torch

import main
from config import Config
from tests.conftest import TEST_SETTINGS
from utils.helpers import models_dir, read_json, run_dir

MAGS = Config().magnifications



@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_root):
    """MMNet trained by the cv stage on fold 0 only, with TTA and SMOTE."""
    from preprocess.analyze import run_analyze
    from preprocess.preprocess import run_split
    from stages.training.stage import run_training
    out = tmp_path_factory.mktemp("experiments") / "output"
    cfg = replace(Config(), **dict(TEST_SETTINGS, data_root=str(tiny_root), output_dir=str(out), epochs=6,
                                   tuples_per_patient=8, patience=6, folds=(0,), tta=True))
    run_analyze(cfg)
    run_split(cfg)
    run_training(cfg, "cv")
    folder = run_dir(cfg, "mmnet", "fold_0")
    return cfg, folder, pd.read_csv(folder / "predictions.csv", keep_default_na=False), read_json(folder / "metrics.json")


def test_training_learns_well_above_chance(trained):
    _, _, _, metrics = trained
    assert metrics["test"]["tuple"]["t0.5"]["auc"] >= 0.75
    assert metrics["test"]["patient"]["t0.5"]["auc"] >= 0.75
    assert metrics["val"]["tuple"]["t0.5"]["auc"] >= 0.75


def test_run_folder_has_the_promised_files_and_fields(trained):
    cfg, folder, pred, metrics = trained
    history = pd.read_csv(folder / "history.csv")
    assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_bal_acc", "val_f1", "val_auc",
            "threshold", "lr", "seconds"} <= set(history.columns)
    assert history["epoch"].tolist() == list(range(1, len(history) + 1))
    for level in ("tuple", "patient"):
        assert set(metrics["test"][level]) == {"t0.5", "youden", "sens95"}
        assert metrics["test"][level]["youden"]["threshold"] == pytest.approx(metrics["threshold"][level]["youden"])
        assert "macro_f1" in metrics["subtype"][level] and "macro_f1" in metrics["subtype_smote"][level]
    assert metrics["classes"] and 1 <= metrics["best_epoch"] <= metrics["epochs"]
    for name in ("best.pth", "last.pth"):
        assert (folder / "checkpoints" / name).exists()
    assert (models_dir(cfg) / "checkpoints" / "mmnet_fold_0.pth").exists()
    tuples = pred[pred["level"] == "tuple"]
    assert set(tuples["subtype_pred_smote"]) <= set(metrics["classes"])
    weights = tuples[[f"w_{m}" for m in MAGS]].astype(float).to_numpy()
    assert np.allclose(weights.sum(1), 1, atol=1e-4)
    assert metrics["tta"] is True


def test_tta_probabilities_reach_the_tables_and_their_thresholds(trained):
    """Under --tta every reported probability is the mean over the four views, and the thresholds are fitted on them."""
    from stages.training.checkpoint import load_model
    from stages.training.data import prepare_run
    from stages.training.forward import predict
    from utils.metrics import youden_threshold
    cfg, folder, pred, metrics = trained
    model, _ = load_model(folder / "checkpoints" / "best.pth")
    run = prepare_run(cfg, "check", "fold_0", "mmnet", {})
    tta = predict(model, run.bank, run.batches["test"], torch.device("cpu"), tta=True)["prob"]
    plain = predict(model, run.bank, run.batches["test"], torch.device("cpu"))["prob"]
    test = pred[(pred["level"] == "tuple") & (pred["role"] == "test")]["prob_malignant"].astype(float).to_numpy()
    assert np.allclose(test, tta, atol=1e-5) and not np.allclose(test, plain, atol=1e-4)
    val = pred[(pred["level"] == "patient") & (pred["role"] == "val")]
    fitted = youden_threshold(val["label"].astype(int), val["prob_malignant"].astype(float))
    assert metrics["threshold"]["patient"]["youden"] == pytest.approx(fitted)


def test_every_test_image_appears_in_predictions(trained):
    from preprocess.analyze import load_index
    from preprocess.preprocess import load_split
    cfg, _, pred, _ = trained
    split = load_split(cfg, "fold_0")
    test_patients = set(split.loc[split["role"] == "test", "patient_id"])
    index = load_index(cfg)
    expected = set(index.loc[index["patient_id"].isin(test_patients), "path"])
    rows = pred[(pred["level"] == "tuple") & (pred["role"] == "test")]
    seen = set(np.concatenate([rows[f"path_{m}"].to_numpy() for m in MAGS])) - {""}
    assert seen == expected
    for m in MAGS:
        assert (rows[f"mask_{m}"].astype(int) == (rows[f"path_{m}"] != "").astype(int)).all()


def test_patient_rows_are_the_mean_of_their_tuples(trained):
    _, _, pred, _ = trained
    for role in ("val", "test"):
        tuples = pred[(pred["level"] == "tuple") & (pred["role"] == role)]
        patients = pred[(pred["level"] == "patient") & (pred["role"] == role)].set_index("patient_id")
        means = tuples.groupby("patient_id")["prob_malignant"].mean()
        assert sorted(patients.index) == sorted(means.index)
        assert np.allclose(patients.loc[means.index, "prob_malignant"].astype(float), means)


def test_checkpoint_reloads_through_the_registry_with_the_same_predictions(trained):
    from preprocess.analyze import load_index
    from preprocess.transforms import prepare
    from preprocess.tuples import tuple_rows
    from stages.training.data import index_bank
    from stages.training.checkpoint import load_model
    from stages.training.forward import tta_prob
    cfg, folder, pred, _ = trained
    model, ckpt = load_model(folder / "checkpoints" / "best.pth")
    assert ckpt["model_name"] == "mmnet" and ckpt["classes"]["binary"] == ["benign", "malignant"]
    assert ckpt["magnifications"] == list(MAGS) and ckpt["image_size"] == cfg.image_size
    rows = pred[(pred["level"] == "tuple") & (pred["role"] == "test")].reset_index(drop=True)
    bank = index_bank(cfg, load_index(cfg))
    assert tuple(ckpt["field"]) == bank.shape and min(bank.shape) == cfg.image_size
    raw, mask = bank.gather(tuple_rows(rows, MAGS, bank.row_of), torch.device("cpu"))
    assert raw.dtype == torch.uint8 and raw.shape == (len(rows), len(MAGS), *bank.shape, 3)
    assert torch.equal(mask, torch.tensor((rows[[f"path_{m}" for m in MAGS]] != "").to_numpy()))
    x, mask = prepare(raw, mask, torch.device("cpu"))
    with torch.no_grad():
        prob = tta_prob(model, x, mask, torch.device("cpu"), None)
    assert np.allclose(prob, rows["prob_malignant"].astype(float), atol=1e-5)


def test_a_finished_run_is_skipped_unless_forced(trained):
    from stages.training.stage import run_training
    cfg, folder, _, _ = trained
    stamp = (folder / "metrics.json").stat().st_mtime_ns
    run_training(cfg, "cv")
    assert (folder / "metrics.json").stat().st_mtime_ns == stamp


def test_every_baseline_and_ablation_builds_and_reads_its_slots(make_cfg):
    from backbones import MODELS, build_model
    from backbones import model_config
    from stages.training.runs import ablation_runs, baseline_runs
    cfg = make_cfg(resnet_backbone="test_resnet")
    specs = baseline_runs(cfg) + ablation_runs(cfg)
    names = [s.name for s in specs]
    assert names == ["simple_concat", "single_40X", "single_100X", "single_200X", "single_400X", "any_mag",
                     "resnet50_transfer_40X", "linear_probe", "mmnet_no_spatial", "mmnet_no_channel", "mmnet_no_hma",
                     "mmnet_no_cmf", "mmnet_only_40X", "mmnet_fields_40X", "mmnet_only_100X", "mmnet_fields_100X",
                     "mmnet_only_200X", "mmnet_fields_200X", "mmnet_only_400X", "mmnet_fields_400X"]
    for spec in [s for s in specs if s.model in MODELS]:
        model = build_model(spec.model, **asdict(model_config(cfg, spec.model, 3, **spec.flags))).eval()
        slots = len(model.magnifications)
        assert slots == (4 if spec.model in ("mmnet", "simple_concat", "linear_probe") and "only" not in spec.name
                         else 1), spec.name
        x, mask = torch.randn(2, slots, 3, 32, 48), torch.tensor([[True, True, False, True][:slots]] * 2)
        with torch.no_grad():
            out = model(x, mask)
        assert out["binary_logits"].shape == (2,) and out["subtype_logits"].shape == (2, 3), spec.name


def test_cv_before_split_names_the_split_stage(make_cfg, capsys):
    cfg = make_cfg()
    code = main.main(["--data-root", cfg.data_root, "--output-dir", cfg.output_dir, "--stages", "cv", "--no-pretrained",
                      "--backbone", cfg.backbone])
    assert code == 2
    assert "Run the 'split' stage first" in capsys.readouterr().out
