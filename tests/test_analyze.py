import shutil
from pathlib import Path

import pandas as pd
import pytest

import main
from tests.conftest import SAMPLES
from preprocess.analyze import (COLUMNS, MARKER, build_index, load_index, parse_name, run_analyze,
                                subtype_classes)
from utils.helpers import PipelineError, index_path, setup_logging, tables_dir


def test_parse_real_sample_names():
    if not SAMPLES.is_dir():
        pytest.skip(f"{SAMPLES} not present")
    parsed = {p.name: parse_name(p.name) for p in SAMPLES.glob("*.png")}
    assert parsed and all(parsed.values())
    assert {p["subtype_code"] for p in parsed.values()} == {"A", "F", "PT", "TA", "DC", "LC", "MC", "PC"}
    assert {p["magnification"] for p in parsed.values()} == {"40X", "100X", "200X", "400X"}
    a = parsed["SOB_B_A-14-22549AB-100-027.png"]
    assert (a["slide_id"], a["patient_id"], a["seq"], a["class_name"]) == ("14-22549AB", "14-22549", 27, "benign")
    assert parsed["SOB_B_F-14-14134E-400-001.png"]["patient_id"] == "14-14134"
    mc = parsed["SOB_M_MC-14-18842D-200-016.png"]
    assert (mc["subtype"], mc["label"], mc["magnification"]) == ("mucinous_carcinoma", 1, "200X")


def test_parse_name_rejects_other_files():
    p = parse_name("SOB_M_DC-14-2980-400-012.png")
    assert (p["label"], p["subtype"], p["slide_id"], p["patient_id"], p["magnification"], p["seq"]) == \
        (1, "ductal_carcinoma", "14-2980", "14-2980", "400X", 12)
    for name in ["Thumbs.db", ".DS_Store", "notes.txt", "SOB_B_DC-14-2980-400-012.png", "SOB_M_XX-14-1-40-1.png",
                 "SOB_M_DC-14-2980-300-012.png", "image.png"]:
        assert parse_name(name) is None, name


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def flatten(src, dst):
    dst.mkdir()
    for p in Path(src).rglob("SOB_*.png"):
        shutil.copy(p, dst / p.name)
    return dst


def test_tarball_kaggle_and_flat_layouts_give_the_same_index(tiny_root, tmp_path):
    kaggle = tmp_path / "kaggle"
    shutil.copytree(tiny_root / "BreaKHis_v1", kaggle / "BreaKHis_v1" / "BreaKHis_v1")
    flat = flatten(tiny_root, tmp_path / "flat")
    labels = ["file", "label", "subtype", "slide_id", "patient_id", "magnification", "seq"]
    reference = build_index(tiny_root)[0]
    assert list(reference.columns) == COLUMNS
    assert reference["path"].map(lambda p: Path(p).is_absolute()).all()
    for root in (kaggle, flat):
        index, excluded = build_index(root)
        assert len(excluded) == 0
        pd.testing.assert_frame_equal(index[labels], reference[labels])


def test_junk_skipped_and_truncated_png_excluded(tiny_root, tmp_path, make_cfg, capsys):
    root = copy_tree(tiny_root, tmp_path / "data")
    slide = next(root.rglob("40X"))
    for junk in ("Thumbs.db", ".DS_Store", "notes.txt", "random.png"):
        (slide / junk).write_bytes(b"junk")
    broken = next(slide.glob("SOB_*.png"))
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    setup_logging()
    cfg = make_cfg(data_root=str(root))
    run_analyze(cfg)
    index = load_index(cfg)
    assert len(index) == len(build_index(tiny_root)[0]) - 1
    assert broken.name not in set(index["file"])
    excluded = pd.read_csv(tables_dir(cfg) / "excluded_images.csv")
    assert list(excluded.columns) == ["path", "reason"]
    assert [Path(p).name for p in excluded["path"]] == [broken.name]
    assert excluded["reason"].str.len().min() > 0
    console = capsys.readouterr().out
    assert console.count("WARNING") == 1 and broken.name in console
    assert "Thumbs.db" not in console and "random.png" not in console


def test_run_analyze_writes_summary_tables_and_plot(make_cfg, capsys):
    setup_logging()
    cfg = make_cfg(subtype_min_images=30)
    run_analyze(cfg)
    console = capsys.readouterr().out
    index = pd.read_csv(index_path(cfg), dtype=str)
    assert "=== Dataset Summary ===" in console
    assert f"Total Patients (by stem): {index.patient_id.nunique()}" in console
    assert f"Slide folders: {index[['subtype_code', 'slide_id']].drop_duplicates().shape[0]}" in console
    two = index.groupby("patient_id")["subtype"].nunique()
    stem = two[two > 1].index[0]
    assert f"Patient {stem} has images under 2 subtypes" in console
    tables = tables_dir(cfg)
    for name in ("dataset_summary", "images_per_magnification_class", "subtype_summary", "subtype_groups",
                 "excluded_images"):
        assert (tables / f"{name}.csv").exists(), name
    assert pd.read_csv(tables / "excluded_images.csv").empty
    assert (Path(cfg.output_dir) / "plots" / "dataset_distribution.png").stat().st_size > 10_000
    counts = index["subtype"].value_counts()
    small = set(counts[counts < 30].index)
    assert set(index.loc[index.subtype.isin(small), "subtype_group"]) == {"Other"}
    classes = subtype_classes(load_index(cfg))
    assert classes[-1] == "Other" and len(classes) == len(counts) - len(small) + 1


@pytest.mark.parametrize("case", ["missing", "empty", "junk_only", "only_nested_synthetic"])
def test_wrong_root_is_a_clear_error_not_a_traceback(case, tmp_path, tiny_root, capsys):
    bad = tmp_path / "nowhere"
    if case != "missing":
        bad.mkdir()
    if case == "junk_only":
        (bad / "Thumbs.db").write_bytes(b"x")
        (bad / "readme.txt").write_text("x")
    if case == "only_nested_synthetic":
        shutil.copytree(tiny_root, bad / "synthetic")
        assert (bad / "synthetic" / MARKER).exists()
    code = main.main(["--data-root", str(bad), "--output-dir", str(tmp_path / "out"), "--stages", "analyze"])
    console = capsys.readouterr().out
    assert code == 2
    assert str(bad.resolve()) in console
    assert "setup.sh" in console and "--demo" in console and "histology_slides" in console
    assert "Traceback" not in console


def test_stem_with_both_classes_is_an_error(tiny_root, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    png = next(tiny_root.rglob("SOB_*.png")).read_bytes()
    (root / "SOB_B_A-14-777-40-001.png").write_bytes(png)
    (root / "SOB_M_DC-14-777AB-40-001.png").write_bytes(png)
    with pytest.raises(PipelineError, match="14-777"):
        build_index(root)


def test_two_copies_at_the_same_depth_is_an_error(tiny_root, tmp_path):
    shutil.copytree(tiny_root / "BreaKHis_v1", tmp_path / "a" / "BreaKHis_v1")
    shutil.copytree(tiny_root / "BreaKHis_v1", tmp_path / "b" / "BreaKHis_v1")
    with pytest.raises(PipelineError, match="several BreakHis copies"):
        build_index(tmp_path)
