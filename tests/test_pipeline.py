"""End-to-end: every stage on the tiny synthetic tree, the files README promises, and determinism."""
import filecmp

import numpy as np

import pandas as pd
import pytest

import main

PROMISED_TABLES = [
    "dataset_summary.csv", "excluded_images.csv", "split_summary.csv",
    "table_1_cross_validation_k_fold_results.csv", "table_2_patient_wise_results.csv",
    "table_3_ablation_results.csv", "table_4_baseline_comparison.csv", "table_5_per_magnification_results.csv",
    "table_6_triage.csv", "table_7_conformal.csv", "table_8_robustness.csv",
]
PROMISED_PLOT_DIRS = [
    "confusion_matrices", "roc_curves", "training_curves", "calibration", "magnification_importance",
    "attention_maps", "gradcam",
]


def flags(cfg, stages):
    return [
        "--data-root", cfg.data_root, "--output-dir", cfg.output_dir, "--stages", stages, "--synthetic",
        "--no-pretrained", "--backbone", cfg.backbone, "--image-size", str(cfg.image_size),
        "--subtype-min-images", str(cfg.subtype_min_images), "--epochs", str(cfg.epochs),
        "--batch-size", str(cfg.batch_size), "--tuples-per-patient", str(cfg.tuples_per_patient),
        "--warmup-epochs", "1", "--bootstrap", "20", "--no-amp", "--lr", str(cfg.lr), "--resnet-backbone", "test_resnet",
    ]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_root):
    from tests.conftest import TEST_SETTINGS
    from config import Config
    from dataclasses import replace
    out = tmp_path_factory.mktemp("e2e") / "output"
    cfg = replace(Config(), **dict(TEST_SETTINGS, data_root=str(tiny_root), output_dir=str(out)))
    code = main.main(flags(cfg, ",".join(main.DEFAULT)) + ["--folds", "0"])
    return code, out


def test_every_stage_runs(full_run):
    code, out = full_run
    assert code == 0
    times = pd.read_csv(out / "logs" / "stage_times.csv")
    assert list(times.stage) == list(main.DEFAULT)


def test_promised_files_exist_and_are_not_empty(full_run):
    _, out = full_run
    for name in PROMISED_TABLES:
        assert (out / "tables" / name).stat().st_size > 0, name
    for name in PROMISED_PLOT_DIRS:
        pngs = list((out / "plots" / name).rglob("*.png"))
        assert pngs, name
        assert all(p.stat().st_size > 1000 for p in pngs), name
    assert (out / "models" / "best_model.pth").stat().st_size > 0
    assert (out / "config.json").read_text().count('"synthetic_data": true') == 1
    assert (out / "logs" / "pipeline.log").stat().st_size > 0


def test_robustness_scores_the_clean_input_as_the_run_did(full_run):
    _, out = full_run
    for run in ("mmnet", "simple_concat"):
        folder = out / "runs" / run / "fold_0"
        robust = pd.read_csv(folder / "robustness.csv", dtype={"patient_id": str})
        pred = pd.read_csv(folder / "predictions.csv", dtype={"patient_id": str})
        own = pred[(pred["level"] == "patient") & (pred["role"] == "test")].set_index("patient_id")["prob_malignant"]
        clean = robust[robust["condition"] == "clean"].set_index("patient_id")["prob_malignant"]
        assert robust["condition"].nunique() == 17 and set(clean.index) == set(own.index)
        assert np.allclose(clean.sort_index(), own.sort_index(), atol=1e-5), run
    table = pd.read_csv(out / "tables" / "table_8_robustness.csv")
    assert set(table["model"]) == {"mmnet", "simple_concat"} and len(table) == 34


def test_same_seed_twice_gives_identical_outputs(tmp_path, make_cfg):
    runs = []
    for name in ("a", "b"):
        cfg = make_cfg(output_dir=str(tmp_path / name))
        assert main.main(flags(cfg, "analyze,split,fixed,report")) == 0
        runs.append(tmp_path / name)
    a, b = runs
    for rel in ["splits/fold_0.csv", "splits/fixed.csv", "runs/mmnet/fixed/predictions.csv",
                "tables/table_2_patient_wise_results.csv"]:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def test_other_seed_changes_the_splits(tmp_path, make_cfg):
    cfg = make_cfg()
    for name, seed in (("a", "1"), ("b", "2")):
        assert main.main(flags(cfg, "analyze,split") + ["--output-dir", str(tmp_path / name), "--seed", seed]) == 0
    assert not filecmp.cmp(tmp_path / "a/splits/fold_0.csv", tmp_path / "b/splits/fold_0.csv", shallow=False)
