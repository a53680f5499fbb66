"""The fold ensemble row of table 2, and --runs picking runs of a stage."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import main
from config import Config
from tests.conftest import TEST_SETTINGS


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_root):
    """Two CV folds and the fixed split of the reference model, then the report."""
    from preprocess.analyze import run_analyze
    from preprocess.preprocess import run_split
    from stages.report import run_report
    from stages.training import run_cv, run_fixed
    out = tmp_path_factory.mktemp("ensemble") / "output"
    cfg = replace(Config(), **dict(TEST_SETTINGS, data_root=str(tiny_root), output_dir=str(out), epochs=1,
                                   folds=(0, 1)))
    run_analyze(cfg)
    run_split(cfg)
    run_cv(cfg)
    run_fixed(cfg)
    run_report(cfg)
    return cfg


def test_the_fold_ensemble_averages_the_fold_models_on_the_fixed_test_patients(trained):
    from stages.engine.checkpoint import load_model
    from stages.engine.data import prepare_run
    from stages.engine.predict import predict
    from stages.ensemble import ENSEMBLE
    from utils.helpers import run_dir
    pred = pd.read_csv(run_dir(trained, ENSEMBLE, "fixed") / "predictions.csv", dtype={"patient_id": str})
    test = pred[(pred["level"] == "tuple") & (pred["role"] == "test")]
    run = prepare_run(trained, "check", "fixed", "mmnet", {})
    probs = []
    for fold in ("fold_0", "fold_1"):
        model, _ = load_model(run_dir(trained, "mmnet", fold) / "checkpoints" / "best.pth")
        probs.append(predict(model, run.bank, run.batches["test"], torch.device("cpu"))["prob"])
    assert np.allclose(test["prob_malignant"].to_numpy(), np.mean(probs, 0), atol=1e-5)
    assert not np.allclose(probs[0], probs[1])


def test_table_2_has_the_ensemble_row(trained):
    from stages.ensemble import ENSEMBLE
    table = pd.read_csv(f"{trained.output_dir}/tables/table_2_patient_wise_results.csv")
    assert set(table["model"]) == {"mmnet", ENSEMBLE}
    rows = table[(table["model"] == ENSEMBLE) & (table["level"] == "patient")]
    assert len(rows) == 3 and rows["auc"].between(0, 1).all()


def test_runs_picks_runs_of_a_stage_and_names_unknown_ones(trained, capsys):
    from utils.helpers import run_dir
    args = ["--data-root", trained.data_root, "--output-dir", trained.output_dir, "--synthetic", "--no-pretrained",
            "--backbone", trained.backbone, "--image-size", str(trained.image_size), "--epochs", "1",
            "--subtype-min-images", str(trained.subtype_min_images), "--folds", "0", "--stages", "baselines"]
    assert main.main(args + ["--runs", "linear_probe"]) == 0
    assert (run_dir(trained, "linear_probe", "fold_0") / "metrics.json").exists()
    assert not run_dir(trained, "simple_concat", "fold_0").exists()
    assert main.main(args + ["--runs", "linear_prob"]) == 2
    assert "unknown run name(s) linear_prob" in capsys.readouterr().out


def test_a_baseline_without_its_own_weights_is_skipped_with_a_warning(monkeypatch):
    import stages.training as training
    from stages.runs import stage_runs
    from utils.helpers import PipelineError
    warnings = []

    def offline(name, pretrained=True, **kwargs):
        raise PipelineError(f"could not load ImageNet weights for backbone '{name}' (OSError: offline). Either ...")
    monkeypatch.setattr(training, "create_backbone", offline)
    monkeypatch.setattr(training, "warn", warnings.append)
    cfg = replace(Config(), pretrained=True)
    skipped = [s.name for s in stage_runs(cfg, "baselines") if training.weights_missing(cfg, s)]
    assert skipped == ["resnet50_transfer"]
    assert "OSError: offline" in warnings[0] and "--no-pretrained" in warnings[0]
    assert not training.weights_missing(replace(cfg, pretrained=False), stage_runs(cfg, "baselines")[-2])
