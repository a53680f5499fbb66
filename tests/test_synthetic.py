import numpy as np
import pytest
from PIL import Image

from preprocess.analyze import MARKER, build_index, parse_name
from preprocess.synthetic import DIFFICULTY, main, make_synthetic, plan, render
from utils.helpers import PipelineError

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
    with pytest.raises(PipelineError, match="layout"):
        make_synthetic(tmp_path / "bad", preset="tiny", layout="zip", **small)
    with pytest.raises(PipelineError, match="difficulty"):
        make_synthetic(tmp_path / "bad", preset="tiny", difficulty="extreme", **small)


def test_render_is_deterministic_by_seed():
    row = plan("tiny", seed=0).iloc[0].to_dict()
    assert np.array_equal(render(row, seed=0), render(row, seed=0))
    assert not np.array_equal(render(row, seed=0), render(row, seed=1))


def hematoxylin_share(img):
    """Share of dark, blue-purple (nuclear) pixels."""
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return float(((b > r) & (r + g + b < 400)).mean())


def test_malignant_fields_are_denser_in_nuclei_at_every_magnification():
    files = plan("tiny", seed=0, difficulty="easy").groupby(["class_name", "magnification"]).head(4)
    files["nuclei"] = [hematoxylin_share(render(r, seed=0)) for r in files.to_dict("records")]
    share = files.groupby(["magnification", "class_name"])["nuclei"].mean().unstack()
    assert (share["malignant"] > 1.5 * share["benign"]).all(), share


def test_presets_default_difficulty_and_cli_flag(tmp_path):
    assert plan("tiny")["difficulty"].unique().tolist() == ["easy"]
    assert plan("demo")["difficulty"].unique().tolist() == ["default"]
    assert plan("full")["difficulty"].unique().tolist() == ["default"]
    main(["--root", str(tmp_path), "--preset", "tiny", "--difficulty", "hard", "--workers", "1"])
    assert "difficulty=hard" in (tmp_path / MARKER).read_text()
    assert len(list(tmp_path.rglob("*.png"))) == len(plan("tiny"))


def test_difficulty_changes_latents_not_files():
    easy, hard = plan("demo", seed=3, difficulty="easy"), plan("demo", seed=3, difficulty="hard")
    assert easy["relpath"].tolist() == hard["relpath"].tolist()
    assert easy.equals(plan("demo", seed=3, difficulty="easy"))
    malignant = easy["class_name"].eq("malignant")
    assert (easy.loc[malignant, "expression"] > 0).all() and (easy.loc[~malignant, "expression"] == 0).all()
    assert (hard.loc[malignant, "expression"] == 0).mean() > 0.3
    assert hard["hematoxylin"].std() > 2 * easy["hematoxylin"].std()


def test_default_cue_follows_each_patients_focus():
    files = plan("full", seed=0)
    malignant = files[files["class_name"] == "malignant"]
    patients = malignant.groupby("patient_id")["focus"].first().value_counts(normalize=True)
    p_low, p_high = DIFFICULTY["default"]["focus"]
    assert patients["low"] == pytest.approx(p_low, abs=0.05) and patients["high"] == pytest.approx(p_high, abs=0.05)
    shows = malignant.assign(low=malignant["magnification"].isin(["40X", "100X"]), shows=malignant["expression"] > 0)
    share = shows.groupby(["focus", "low"])["shows"].mean()
    d = DIFFICULTY["default"]
    on, off = 1 - d["blank"] / 2, d["off"]
    assert share["low", True] == pytest.approx(on, abs=0.08) and share["low", False] < off + 0.1
    assert share["high", False] == pytest.approx(on, abs=0.08) and share["high", True] < off + 0.1
    assert share["all", True] == pytest.approx(on, abs=0.08) and share["all", False] == pytest.approx(on, abs=0.08)
    benign = files[files["class_name"] == "benign"].assign(looks=lambda f: f["expression"] > 0)
    assert (benign["looks"]).mean() == pytest.approx(d["flip"] / 2, abs=0.05)
    per_patient = benign.groupby("patient_id")["looks"].mean()
    assert per_patient.min() < 0.05 and per_patient.max() > 0.7 * d["flip"], "each benign patient its own share"


def test_nuisance_is_unrelated_to_the_class():
    files = plan("full", seed=0).groupby("patient_id").first()
    for column in ("density", "hematoxylin", "eosin"):
        by_class = files.groupby("class_name")[column]
        assert abs(by_class.mean().diff().iloc[-1]) < 0.5 * files[column].std(), column


def test_expression_sets_the_tumour_share_of_a_field():
    row = plan("demo", seed=0).query("class_name == 'malignant' and magnification == '100X'").iloc[0].to_dict()
    share = [hematoxylin_share(render(dict(row, expression=e), seed=0)) for e in (0.0, 0.4, 0.9)]
    assert share[0] < share[1] < share[2], share
