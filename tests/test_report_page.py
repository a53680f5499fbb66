"""The report page and the paper tables on fabricated run folders: every image and link resolves, every section is
filled, missing runs are named, significance columns agree with a recomputation from predictions.csv."""
import json
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from config import Config
from stages.report.report import run_report
from tests.test_report import MAGS, fabricate
from utils import scoring as S
from utils import stats
from utils.helpers import run_dir
from stages.report.registry import TABLE_NAMES

TABLE_SECTIONS = [f"table_{k}" for k in range(1, 8)]


class Page(HTMLParser):
    """Image sources, link targets and the text of each <section> of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.sections, self.rows = [], [], {}, {}
        self.current, self.in_body = None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = attrs.get("id")
            self.sections[self.current], self.rows[self.current] = "", 0
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "tbody":
            self.in_body = True
        if tag == "tr" and self.in_body and self.current:
            self.rows[self.current] += 1

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None
        if tag == "tbody":
            self.in_body = False

    def handle_data(self, data):
        if self.current:
            self.sections[self.current] += data.strip()


def extras(out):
    """A Grad-CAM listing with one figure and a tuning folder, as the explain and tune stages write them."""
    for folder in ("plots/gradcam", "plots/attention_maps", "tuning"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), "white").save(out / "plots/gradcam/benign_correct_0_P01.png")
    Image.new("RGB", (40, 20), "white").save(out / "tuning/optimization_history.png")
    pd.DataFrame([dict(category="benign_correct", patient_id="P01", tuple_id="P01#0", label=0, pred=0,
                       prob_malignant=0.1, gradcam="gradcam/benign_correct_0_P01.png", attention_map="", note=""),
                  dict(category="benign_wrong", note="no wrong predictions for true benign tuples")]).to_csv(
        out / "plots/gradcam/index.csv", index=False)
    pd.DataFrame(dict(number=[0, 1], value=[0.8, 0.9])).to_csv(out / "tuning/trials.csv", index=False)
    (out / "tuning/best_config.json").write_text(json.dumps(dict(lr=0.001)))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "output"
    cfg = replace(Config(), output_dir=str(out), device="cpu", bootstrap=30, magnifications=MAGS, synthetic=True)
    fabricate(cfg)
    extras(out)
    run_report(cfg)
    parsed = Page()
    parsed.feed((out / "report.html").read_text(encoding="utf-8"))
    return cfg, out, parsed


def test_every_image_and_link_resolves_to_a_file(page):
    _, out, parsed = page
    assert len(parsed.images) > 20
    for src in parsed.images:
        assert (out / src).is_file(), src
    files = [href for href in parsed.links if not href.startswith("#")]
    assert any(href.endswith("predictions.csv") for href in files)
    for href in files:
        assert (out / href).is_file(), href
    csvs = {str(p.relative_to(out)) for p in out.rglob("*.csv")}
    assert csvs <= set(files)


def test_every_section_is_filled_and_each_table_has_rows(page):
    _, _, parsed = page
    assert {"headline", "run", "notes", "efficiency", "subtypes", "curves", "gallery", "tuning", "files"} <= set(
        parsed.sections)
    for name, text in parsed.sections.items():
        assert len(text) > 40, name
    for name in TABLE_SECTIONS:
        assert parsed.rows[name] >= 1, name
    assert parsed.rows["table_3"] >= 8 and parsed.rows["table_4"] >= 6


def test_page_names_missing_runs_and_shows_what_exists(page):
    _, out, parsed = page
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "SYNTHETIC DATA" in html and "mmnet_only_400X" in parsed.sections["notes"]
    assert "plots/gradcam/benign_correct_0_P01.png" in parsed.images
    assert "no wrong predictions for true benign tuples" in parsed.sections["gallery"]
    assert "tuning/optimization_history.png" in parsed.images and "tuning/trials.csv" in parsed.links
    assert "0.001" in parsed.sections["tuning"]
    assert "PRD target" in parsed.sections["headline"] and "95 % CI" in parsed.sections["headline"]


def test_paper_tables_are_booktabs_with_captions_and_bold_best(page):
    _, out, _ = page
    folder = out / "tables" / "paper"
    for k in range(1, 6):
        tex = (folder / f"table_{k}.tex").read_text()
        md = (folder / f"table_{k}.md").read_text()
        assert all(rule in tex for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\caption{", "\\label{"))
        assert "±" not in tex and md.startswith(f"**Table {k}.**")
    t1 = (folder / "table_1.md").read_text()
    assert "patient-wise 5-fold" in t1 and "30 test patients" in t1 and "threshold: 0.5" in t1 and " ± " in t1
    t4 = pd.read_csv(out / "tables" / TABLE_NAMES["baseline"])
    patient = t4[t4["level"] == "patient"]
    leader = patient.loc[patient["accuracy_mean"].idxmax(), "model"]
    md4 = (folder / "table_4.md").read_text()
    line = next(row for row in md4.splitlines() if row.startswith(f"| {leader} "))
    assert line.split("|")[3].strip().startswith("**")
    assert "\\bfseries" in (folder / "table_4.tex").read_text()
    assert "p DeLong" in md4 and "p McNemar" in md4 and "ΔAUC" in md4


def paired_patients(cfg, name, folds):
    rows = []
    for fold in folds:
        ref, own = (S.load_run(run_dir(cfg, n, fold)) for n in ("mmnet", name))
        a, b = S.scored_frame(ref, "patient", "val_youden"), S.scored_frame(own, "patient", "val_youden")
        rows.append(a.merge(b, on="patient_id", suffixes=("_ref", "")))
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("name", ["mmnet_no_hma", "simple_concat"])
def test_significance_columns_agree_with_a_recomputation(page, name):
    cfg, out, _ = page
    table = pd.read_csv(out / "tables" / TABLE_NAMES["ablation"])
    row = table[(table["model"] == name) & (table["level"] == "patient")].iloc[0]
    pairs = paired_patients(cfg, name, row["folds"].split())
    y = pairs["label"].to_numpy()
    expected = stats.delong(y, pairs["prob_malignant_ref"], pairs["prob_malignant"])
    assert row["n_paired_patients"] == len(pairs) == row["n_patients"]
    assert row["delong_p"] == pytest.approx(expected["p"], rel=1e-3)
    decisions = stats.mcnemar(y, pairs["prob_malignant_ref"] >= pairs["thr_ref"], pairs["prob_malignant"] >= pairs["thr"])
    assert row["mcnemar_p"] == pytest.approx(decisions["p"], rel=1e-3)
    assert row["auc_diff"] == pytest.approx(row["auc_drop"], abs=2e-4)
    assert row["auc_diff_ci_low"] <= row["auc_diff"] + 1e-4 <= row["auc_diff_ci_high"] + 2e-4
    reference = table[(table["model"] == "mmnet")]
    assert reference["delong_p"].isna().all()
    tuples = table[(table["model"] == name) & (table["level"] == "tuple")].iloc[0]
    assert tuples["n_paired"] > row["n_paired"] and np.isfinite(tuples["delong_p"])
