"""Every number comes from the settings and the patients it claims: a finished run is reused only under the settings
it was trained with, thresholds decide at the level they were fitted on, and a model that reads one magnification
counts each of its images once."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import main
from tests.test_pipeline import flags
from utils.helpers import read_json, run_dir
from utils.metrics import patient_level
from utils.scoring import fitted_thresholds
from utils.tables import Book


def sensitivity(frame, threshold):
    malignant = frame[frame["label"] == 1]
    return float((malignant["prob_malignant"] >= threshold).mean())


def tuples(patients):
    """Tuple rows of {patient: (label, [probabilities])}."""
    return pd.DataFrame([dict(patient_id=p, label=y, prob_malignant=v) for p, (y, probs) in patients.items()
                         for v in probs])


def test_a_patient_threshold_is_fitted_on_the_patients_it_decides():
    """Youden's J fitted on tuples and applied to patient means misses malignant patients whose tuples disagree; the
    one fitted on the patients' mean probabilities does not."""
    patients = {f"M{i}": (1, [0.9, 0.9, 0.2, 0.2] if i < 2 else [0.7] * 4) for i in range(10)}
    patients |= {f"B{i}": (0, [0.3, 0.3, 0.6, 0.1]) for i in range(10)}
    rows = tuples(patients)
    means = patient_level(rows)
    on_tuples, on_patients = fitted_thresholds(rows)["youden"], fitted_thresholds(means)["youden"]
    assert sensitivity(means, on_tuples) == pytest.approx(0.8)
    assert sensitivity(means, on_patients) == 1.0


def test_sens95_reaches_95_percent_on_the_patients_it_was_fitted_on():
    patients = {f"M{i}": (1, [0.8, 0.8, 0.8, 0.0] if i < 3 else [0.8] * 4) for i in range(20)}
    patients |= {f"B{i}": (0, [0.1, 0.2, 0.3, 0.4]) for i in range(20)}
    rows = tuples(patients)
    means = patient_level(rows)
    assert sensitivity(means, fitted_thresholds(rows)["sens95"]) == pytest.approx(0.85)
    assert sensitivity(means, fitted_thresholds(means)["sens95"]) >= 0.95


def command(cfg, stages, *more):
    return flags(cfg, stages) + ["--folds", "0", "--runs", "mmnet", *more]


def test_a_finished_run_is_reused_under_other_compute_flags_and_refused_under_other_settings(make_cfg, capsys):
    cfg = make_cfg(epochs=1)
    assert main.main(command(cfg, "analyze,split,cv")) == 0
    metrics = run_dir(cfg, "mmnet", "fold_0") / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert main.main(command(cfg, "cv", "--jobs", "1", "--bootstrap", "50", "--no-tensorboard")) == 0
    assert metrics.stat().st_mtime_ns == stamp
    assert "under the same settings; reused" in capsys.readouterr().out
    assert main.main(command(cfg, "cv", "--epochs", "2", "--lr", "0.01")) == 2
    text = capsys.readouterr().out
    assert "mmnet/fold_0: epochs 1 -> 2; lr 0.002 -> 0.01" in text
    assert "--force" in text and "--output-dir" in text and "Nothing was trained or deleted" in text
    assert metrics.stat().st_mtime_ns == stamp
    assert json.loads((Path(cfg.output_dir) / "config.json").read_text())["config"]["epochs"] == 1
    assert main.main(command(cfg, "cv", "--epochs", "2", "--force")) == 0
    record = read_json(run_dir(cfg, "mmnet", "fold_0") / "record.json")
    assert record["settings"]["epochs"] == 2 and record["trained_by"] and record["digest"]
    metrics.unlink()
    assert main.main(command(cfg, "cv", "--epochs", "3", "--resume")) == 2
    assert "mmnet/fold_0: epochs 2 -> 3" in capsys.readouterr().out


def test_an_old_run_folder_without_a_record_is_not_reused(make_cfg, capsys):
    cfg = make_cfg(epochs=1)
    assert main.main(command(cfg, "analyze,split,cv")) == 0
    (run_dir(cfg, "mmnet", "fold_0") / "record.json").unlink()
    assert main.main(command(cfg, "cv")) == 2
    assert "no record of its settings" in capsys.readouterr().out


def uneven_tree(tiny_root, root):
    """The tiny tree with every other 200X image of each slide deleted, so 200X has fewer images than the others."""
    shutil.copytree(tiny_root, root)
    for folder in sorted(root.rglob("200X")):
        for path in sorted(folder.glob("*.png"))[1::2]:
            path.unlink()
    return root


def test_a_single_magnification_patient_score_is_the_mean_over_its_distinct_images(make_cfg, tiny_root, tmp_path):
    from preprocess.analyze import load_index, run_analyze
    from preprocess.preprocess import run_split
    from preprocess.tuples import eval_tuples
    from stages.training.run import run_one
    from stages.training.runs import baseline_runs
    cfg = make_cfg(data_root=str(uneven_tree(tiny_root, tmp_path / "tree")), epochs=1)
    run_analyze(cfg)
    run_split(cfg)
    spec = next(s for s in baseline_runs(cfg) if s.name == "single_200X")
    run_one(cfg, spec, "fold_0")
    pred = pd.read_csv(run_dir(cfg, spec.name, "fold_0") / "predictions.csv", dtype={"patient_id": str},
                       keep_default_na=False)
    test = pred[(pred["role"] == "test") & (pred["level"] == "tuple")]
    index = load_index(cfg)
    mine = index[index["patient_id"].isin(test["patient_id"]) & (index["magnification"] == "200X")]
    assert not test.duplicated(["patient_id", "path_200X"]).any()
    assert set(test["path_200X"]) == set(mine["path"])
    patients = pred[(pred["role"] == "test") & (pred["level"] == "patient")].set_index("patient_id")
    means = test.assign(p=test["prob_malignant"].astype(float)).groupby("patient_id")["p"].mean()
    np.testing.assert_allclose(patients["prob_malignant"].astype(float), means.loc[patients.index], atol=1e-6)
    cycled = eval_tuples(index[index["patient_id"].isin(test["patient_id"])], cfg.magnifications)
    by_image = dict(zip(test["path_200X"], test["prob_malignant"].astype(float)))
    counted_twice = cycled.assign(p=cycled["path_200X"].map(by_image)).groupby("patient_id")["p"].mean()
    assert not np.allclose(counted_twice.loc[means.index], means), "the uneven tree must change some patient's score"


def test_the_report_names_a_setting_that_differs_between_rows(make_cfg, capsys):
    cfg = make_cfg(epochs=1)
    base = flags(cfg, "analyze,split,cv,baselines") + ["--folds", "0", "--runs", "mmnet,simple_concat"]
    assert main.main(base) == 0
    retrained = flags(cfg, "baselines,report") + ["--folds", "0", "--runs", "simple_concat", "--epochs", "2",
                                                  "--force"]
    assert main.main(retrained) == 0
    notes = (Path(cfg.output_dir) / "tables" / "report_notes.txt").read_text()
    assert "table 3: setting epochs" in notes and "simple_concat/fold_0" in notes
    assert "Settings differ between rows: epochs" in (Path(cfg.output_dir) / "tables" / "paper" / "table_3.md").read_text()


def test_a_caption_names_the_backbone_of_a_model_built_on_another():
    record = lambda backbone: {"record": {"settings": {"epochs": 4, "backbone": "mobilenetv3_small_050"},  # noqa: E731
                                          "run_settings": {}, "model_kwargs": {"backbone": backbone}}}
    runs = {"mmnet": {"fold_0": record("mobilenetv3_small_050")},
            "resnet50_transfer_40X": {"fold_0": record("resnet10t")},
            "single_40X": {"fold_0": record("mobilenetv3_small_050")}}
    book = Book(runs=runs, reference="mmnet", listed={}, by_mag={})
    book.differing("table 4", {name: ["fold_0"] for name in runs})
    assert book.differs["table 4"] == ["backbone mobilenetv3_small_050 (mmnet/fold_0, single_40X/fold_0); "
                                       "resnet10t (resnet50_transfer_40X/fold_0)"]
    book.differing("table 3", {"mmnet": ["fold_0"], "single_40X": ["fold_0"]})
    assert book.differs["table 3"] == []
