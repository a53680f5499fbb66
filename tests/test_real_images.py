"""Real BreakHis images (../shared/data/breakhis_real): index, partial magnifications, a one-class subtype head
end to end (subtype metrics n/a, never 1.000), and the subtype-threshold warning."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

import main
from config import MAGNIFICATIONS, Config
from preprocess.analyze import build_index, group_subtypes, subtype_classes, subtype_warning
from preprocess.tuples import eval_tuples
from stages.training.run import fold_line
from stages.report.plots import confusion_plots
from stages.report.registry import TABLE_NAMES
from utils import scoring as S
from utils import tables as T
from utils.helpers import plots_dir, runs_dir, tables_dir

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "breakhis_real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/breakhis_real is not beside the repository")


@pytest.fixture(scope="module")
def index():
    return build_index(REAL)[0]


@needs_real
def test_every_real_image_and_patient_is_indexed(index):
    mags = index.groupby("patient_id")["magnification"].nunique()
    assert len(index) == 117 and index["patient_id"].nunique() == 23
    assert (mags >= 2).sum() == 9 and (mags == 4).sum() == 1
    assert index.groupby("patient_id")["label"].nunique().max() == 1


@needs_real
def test_tuples_cover_patients_missing_magnifications(index):
    tuples = eval_tuples(index, MAGNIFICATIONS)
    paths = tuples[[f"path_{m}" for m in MAGNIFICATIONS]]
    assert set(paths.to_numpy().ravel()) - {""} == set(index["path"])
    assert set(tuples["patient_id"]) == set(index["patient_id"])
    single = index.groupby("patient_id")["magnification"].nunique().eq(1)
    lonely = tuples[tuples["patient_id"].map(single)]
    assert ((paths.loc[lonely.index] != "").sum(axis=1) == 1).all()


@needs_real
def test_subtype_warning_names_the_flag_and_a_scaled_value(index):
    text = subtype_warning(index, 500)
    assert "--subtype-min-images 500" in text and "n/a" in text and "--subtype-min-images 7 " in text
    regrouped = index.assign(subtype_group=group_subtypes(index, 7))
    assert len(subtype_classes(regrouped)) == 3
    assert subtype_warning(regrouped, 7) == ""


def test_no_warning_when_a_breakhis_sized_set_keeps_two_classes():
    counts = {"ductal_carcinoma": 3451, "fibroadenoma": 1014, "adenosis": 444, "phyllodes_tumor": 453,
              "tubular_adenoma": 569, "lobular_carcinoma": 626, "mucinous_carcinoma": 792, "papillary_carcinoma": 560}
    frame = pd.DataFrame({"subtype": [s for s, n in counts.items() for _ in range(n)]})
    assert subtype_warning(frame.assign(subtype_group=group_subtypes(frame, 1000)), 1000) == ""
    assert "one class" in subtype_warning(frame.assign(subtype_group=group_subtypes(frame, 5000)), 5000)


def test_subtype_macro_scores_are_undefined_with_one_true_class():
    assert S.defined_subtype_metrics([0, 0, 0], [0, 0, 0], ["Other"]) is None
    one = S.defined_subtype_metrics([1, 1, 1], [1, 1, 1], ["a", "b", "c"])
    assert np.isnan(one["macro_f1"]) and np.isnan(one["balanced_accuracy"]) and one["micro_f1"] == 1.0
    two = S.defined_subtype_metrics([0, 1, 1], [0, 1, 0], ["a", "b", "c"])
    assert two["macro_f1"] == pytest.approx(f1_score([0, 1, 1], [0, 1, 0], average="macro"))


@pytest.fixture(scope="module")
def one_class_run(tmp_path_factory):
    """analyze, split and one CV fold on the real images with the default --subtype-min-images (one class)."""
    out = tmp_path_factory.mktemp("real") / "output"
    argv = ["--data-root", str(REAL), "--output-dir", str(out), "--stages", "analyze,split,cv", "--folds", "0",
            "--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "32", "--epochs", "1",
            "--tuples-per-patient", "2", "--batch-size", "8", "--bootstrap", "20", "--no-amp", "--device", "cpu"]
    assert main.main(argv) == 0
    return replace(Config(), output_dir=str(out), bootstrap=20), out


@needs_real
def test_one_class_subtype_head_reads_na_everywhere(one_class_run, tmp_path):
    cfg, out = one_class_run
    console = (out / "logs" / "pipeline.log").read_text()
    assert "--subtype-min-images 7" in console and "subtype macro-F1 n/a (SMOTE n/a)" in console
    runs = S.load_runs(runs_dir(cfg))
    assert runs["mmnet"]["fold_0"]["classes"] == ["Other"]
    assert fold_line("mmnet/fold_0", runs["mmnet"]["fold_0"]["metrics"]).count("n/a") == 2
    book = T.Book(runs, "mmnet", {"ablation": [], "baseline": []}, {}, cfg.bootstrap, cfg.seed)
    T.write_table(cfg, TABLE_NAMES["cv"], T.cv_table(book))
    written = pd.read_csv(tables_dir(cfg) / TABLE_NAMES["cv"], keep_default_na=False, dtype=str)
    assert set(written["subtype_macro_f1"]) == {"n/a"} and set(written["subtype_balanced_accuracy"]) == {"n/a"}
    assert T.subtype_table(book).empty and any("--subtype-min-images" in n for n in book.notes)


@needs_real
def test_one_class_run_draws_no_subtype_confusion_matrix(one_class_run):
    cfg, _ = one_class_run
    splits = S.load_runs(runs_dir(cfg))["mmnet"]
    confusion_plots(cfg, splits, "fold_0", ["fold_0"])
    drawn = sorted(p.name for p in (plots_dir(cfg) / "confusion_matrices").glob("*.png"))
    assert drawn == ["mmnet_fold_0_binary_patient.png", "mmnet_fold_0_binary_tuple.png"]
