import numpy as np
import pytest
from PIL import Image

from preprocess.analyze import build_index, parse_name
from preprocess.synthetic import make_synthetic, plan, render

PRD_MAG_CLASS = {("malignant", "40X"): 1370, ("malignant", "100X"): 1437, ("malignant", "200X"): 1390,
                 ("malignant", "400X"): 1232, ("benign", "40X"): 625, ("benign", "100X"): 644,
                 ("benign", "200X"): 623, ("benign", "400X"): 588}
PRD_SUBTYPES = {"ductal_carcinoma": (38, 3451), "fibroadenoma": (10, 1014), "mucinous_carcinoma": (9, 792),
                "lobular_carcinoma": (5, 626), "tubular_adenoma": (7, 569), "papillary_carcinoma": (6, 560),
                "phyllodes_tumor": (3, 453), "adenosis": (4, 444)}


def slide_folders(files):
    return files[["subtype_code", "slide_id"]].drop_duplicates()


def test_full_plan_reproduces_breakhis_counts():
    files = plan("full", seed=0)
    assert len(files) == 7909
    assert len(slide_folders(files)) == 82
    assert files.groupby(["class_name", "magnification"]).size().to_dict() == PRD_MAG_CLASS
    per_subtype = files.groupby("subtype").agg(slides=("slide_id", "nunique"), images=("file", "size"))
    assert {s: (r.slides, r.images) for s, r in per_subtype.iterrows()} == PRD_SUBTYPES
    assert files["file"].is_unique
    assert files[["width", "height"]].drop_duplicates().values.tolist() == [[700, 460]]


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_small_presets_have_the_edge_cases(preset):
    files = plan(preset, seed=0)
    patients = files.groupby("patient_id").agg(cls=("class_name", "first"), slides=("slide_id", "nunique"),
                                                subtypes=("subtype", "nunique"), mags=("magnification", "nunique"))
    assert patients["cls"].value_counts().min() >= 6
    assert files["subtype_code"].nunique() == 8
    assert (patients["slides"] > 1).any(), "letter-suffixed slides sharing a stem"
    assert (patients["subtypes"] > 1).any(), "a stem under two subtypes"
    assert (patients["mags"] < 4).sum() == 1, "one patient missing a magnification"
    assert all(parse_name(f) is not None for f in files["file"])
    assert files.groupby("patient_id")["class_name"].nunique().max() == 1


def test_tiny_tree_indexes_back_to_its_plan(tiny_root):
    files = plan("tiny", seed=0)
    index, excluded = build_index(tiny_root)
    assert len(excluded) == 0
    assert sorted(index["file"]) == sorted(files["file"])
    key = ["class_name", "subtype", "magnification"]
    assert index.groupby(key).size().to_dict() == files.groupby(key).size().to_dict()
    assert index["patient_id"].nunique() == files["patient_id"].nunique()
    with Image.open(index["path"].iloc[0]) as im:
        assert im.size == (96, 64) and im.mode == "RGB"


def test_layouts_and_overrides(tmp_path):
    small = dict(slides=dict(A=1, DC=1), per_mag=1, size=(40, 30))
    flat = make_synthetic(tmp_path / "flat", preset="tiny", layout="flat", **small)
    assert len(list(flat.glob("SOB_*.png"))) == 8
    kaggle = make_synthetic(tmp_path / "kaggle", preset="tiny", layout="kaggle", **small)
    assert len(list((kaggle / "BreaKHis_v1" / "BreaKHis_v1" / "histology_slides" / "breast").rglob("*.png"))) == 8
    with pytest.raises(ValueError):
        make_synthetic(tmp_path / "bad", preset="tiny", layout="zip", **small)


def test_render_is_deterministic_by_seed():
    row = plan("tiny", seed=0).iloc[0].to_dict()
    assert np.array_equal(render(row, seed=0), render(row, seed=0))
    assert not np.array_equal(render(row, seed=0), render(row, seed=1))


def hematoxylin_share(img):
    """Share of dark, blue-purple (nuclear) pixels."""
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return float(((b > r) & (r + g + b < 400)).mean())


def test_malignant_fields_are_denser_in_nuclei_at_every_magnification():
    files = plan("tiny", seed=0).groupby(["class_name", "magnification"]).head(4)
    files["nuclei"] = [hematoxylin_share(render(r, seed=0)) for r in files.to_dict("records")]
    share = files.groupby(["magnification", "class_name"])["nuclei"].mean().unstack()
    assert (share["malignant"] > 1.5 * share["benign"]).all(), share
