"""Table 2's ensemble of members that never saw its test patients, the leak guard, and --runs picking runs."""
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
    """Two CV folds, the fixed split and table 2's ensemble members of the reference model, then the report."""
    from preprocess.analyze import run_analyze
    from preprocess.preprocess import run_split
    from stages.report.report import run_report
    from stages.training.stage import run_training
    out = tmp_path_factory.mktemp("ensemble") / "output"
    cfg = replace(Config(), **dict(TEST_SETTINGS, data_root=str(tiny_root), output_dir=str(out), epochs=1,
                                   n_folds=3, folds=(0, 1)))
    run_analyze(cfg)
    run_split(cfg)
    run_training(cfg, "cv")
    run_training(cfg, "fixed")
    run_report(cfg)
    return cfg


def patients(cfg, split, roles):
    from preprocess.preprocess import load_split
    rows = load_split(cfg, split)
    return set(rows.loc[rows["role"].isin(roles), "patient_id"].astype(str))


def test_a_run_records_the_patients_it_trained_and_validated_on(trained):
    from utils.helpers import read_json, run_dir
    for name, split in (("mmnet", "fixed"), ("mmnet", "fold_0"), ("mmnet_fixed_member", "member_1")):
        seen = read_json(run_dir(trained, name, split) / "record.json")["seen_patients"]
        assert seen["train"] == sorted(patients(trained, split, ["train"]))
        assert seen["val"] == sorted(patients(trained, split, ["val"]))


def test_the_ensemble_members_never_saw_a_fixed_test_patient(trained):
    from stages.training.ensemble import ENSEMBLE, honest_members
    from utils.helpers import read_json, run_dir
    test = patients(trained, "fixed", ["test"])
    members = honest_members(trained)
    assert len(members) == 3
    held = []
    for path in members:
        seen = read_json(path.parent.parent / "record.json")["seen_patients"]
        assert not test & set(seen["train"] + seen["val"])
        held.append(set(seen["val"]))
    assert set().union(*held) == patients(trained, "fixed", ["train", "val"]) and sum(map(len, held)) == len(set().union(*held))
    ensemble = read_json(run_dir(trained, ENSEMBLE, "fixed") / "record.json")["seen_patients"]
    assert not test & set(ensemble["train"] + ensemble["val"])


def test_the_ensemble_averages_its_members_and_their_own_validation_thresholds(trained):
    from stages.inference.predictor import load_predictor
    from stages.training.checkpoint import load_model
    from stages.training.data import prepare_run
    from stages.training.forward import predict
    from stages.training.ensemble import ENSEMBLE, honest_members
    from utils.helpers import read_json, run_dir
    from utils.metrics import youden_threshold
    pred = pd.read_csv(run_dir(trained, ENSEMBLE, "fixed") / "predictions.csv", dtype={"patient_id": str})
    test = pred[(pred["level"] == "tuple") & (pred["role"] == "test")]
    run = prepare_run(trained, "check", "fixed", "mmnet", {})
    members = honest_members(trained)
    probs = [predict(load_model(p)[0], run.bank, run.batches["test"], torch.device("cpu"))["prob"] for p in members]
    assert np.allclose(test["prob_malignant"].to_numpy(), np.mean(probs, 0), atol=1e-5)
    assert not np.allclose(probs[0], probs[1])
    oof = pred[(pred["level"] == "tuple") & (pred["role"] == "val")]
    assert set(oof["patient_id"]) == patients(trained, "fixed", ["train", "val"])
    metrics = read_json(run_dir(trained, ENSEMBLE, "fixed") / "metrics.json")
    for level in ("tuple", "patient"):
        fits = []
        for k, path in enumerate(members):
            own = pd.read_csv(path.parent.parent / "predictions.csv", dtype={"patient_id": str})
            val = own[(own["level"] == level) & (own["role"] == "val")]
            assert set(val["patient_id"]) == patients(trained, f"member_{k}", ["val"])
            fits.append(youden_threshold(val["label"].to_numpy(), val["prob_malignant"].to_numpy()))
        assert metrics["threshold"][level]["youden"] == pytest.approx(np.mean(fits), abs=1e-4)
        assert metrics["threshold"][level]["oof_youden"] == metrics["threshold"][level]["youden"]
    predictor = load_predictor(members, torch.device("cpu"))
    assert predictor.threshold["youden"] == pytest.approx(metrics["threshold"]["patient"]["youden"], abs=1e-4)


def test_the_ensemble_is_scored_under_a_fitted_rule(trained, tmp_path, capsys):
    import shutil

    from stages.training.ensemble import ENSEMBLE, member_ensemble
    from utils.helpers import read_json, run_dir, setup_logging
    out = tmp_path / "output"
    shutil.copytree(trained.output_dir, out)
    cfg = replace(trained, output_dir=str(out), threshold_rule="val_youden", force=True)
    setup_logging()
    member_ensemble(cfg)
    threshold = read_json(run_dir(cfg, ENSEMBLE, "fixed") / "metrics.json")["threshold"]["patient"]["youden"]
    assert f"(val_youden, t={threshold:.2f})" in capsys.readouterr().out


def test_the_old_fold_ensemble_on_the_fixed_test_patients_is_refused(trained):
    from stages.training.ensemble import score_members
    from utils.helpers import PipelineError, run_dir
    test = patients(trained, "fixed", ["test"])
    folds = ["fold_0", "fold_1"]
    seen = set().union(*(patients(trained, f, ["train", "val"]) for f in folds))
    assert test & seen
    with pytest.raises(PipelineError, match="mmnet_fixed_ensemble/fixed: refusing") as refused:
        score_members(trained, [run_dir(trained, "mmnet", f) for f in folds], folds)
    assert all(p in str(refused.value) for p in test & seen)


def test_the_report_refuses_a_run_whose_models_saw_a_test_patient(trained, tmp_path):
    import shutil

    from stages.report.report import run_report
    from utils.helpers import PipelineError, read_json, write_json
    out = tmp_path / "output"
    shutil.copytree(trained.output_dir, out)
    path = out / "runs" / "mmnet" / "fixed" / "record.json"
    record = read_json(path)
    leaked = sorted(patients(trained, "fixed", ["test"]))[0]
    record["sources"][0]["train"].append(leaked)
    write_json(path, record)
    with pytest.raises(PipelineError, match=f"mmnet/fixed: refusing .*mmnet/fixed trained on {leaked}"):
        run_report(replace(trained, output_dir=str(out)))


def test_check_no_leak_names_the_run_the_source_and_the_patients():
    from utils.helpers import PipelineError
    from utils.scoring import check_no_leak
    sources = [dict(name="run/x", train=["a", "b"], val=["c"]), dict(name="tuning study S", train=["e"], val=[])]
    check_no_leak(sources, ["d", "f"], "run/x")
    with pytest.raises(PipelineError, match=r"run/x: refusing .*run/x trained on b; run/x validated on c; "
                                            r"tuning study S trained on e"):
        check_no_leak(sources, ["b", "c", "d", "e"], "run/x")


def test_table_2_has_the_ensemble_row(trained):
    from stages.training.ensemble import ENSEMBLE
    table = pd.read_csv(f"{trained.output_dir}/tables/table_2_patient_wise_results.csv")
    assert set(table["model"]) == {"mmnet", ENSEMBLE}
    rows = table[(table["model"] == ENSEMBLE) & (table["level"] == "patient")]
    assert set(rows["threshold_rule"]) == {"val_youden", "fixed_0.5", "val_sens95", "oof_youden"}
    assert rows["auc"].between(0, 1).all()


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
    import stages.training.stage as training
    from stages.training.runs import stage_runs
    from utils.helpers import PipelineError
    warnings = []

    def offline(name, pretrained=True, **kwargs):
        raise PipelineError(f"could not load ImageNet weights for backbone '{name}' (OSError: offline). Either ...")
    monkeypatch.setattr(training, "create_backbone", offline)
    monkeypatch.setattr(training, "warn", warnings.append)
    cfg = replace(Config(), pretrained=True)
    skipped = [s.name for s in stage_runs(cfg, "baselines") if training.weights_missing(cfg, s)]
    assert skipped == ["resnet50_transfer_40X"]
    assert "OSError: offline" in warnings[0] and "--no-pretrained" in warnings[0]
    assert not training.weights_missing(replace(cfg, pretrained=False), stage_runs(cfg, "baselines")[-2])
