"""The report page: output/report.html, one self-contained file rendered by Jinja2 from the tables and plots."""
import datetime
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from stages.report import facts
from stages.training.runs import REFERENCE
from utils.helpers import num, write_text
from utils.paper import PaperTable, assemble, count
from utils.tables import TABLE_NAMES

TEMPLATES = Path(__file__).resolve().parent / "templates"
REF = REFERENCE
FIGURES = {
    "table_1": [([f"plots/roc_curves/{REF}_cv_patient.png"], "ROC per fold, patient level"),
                ([f"plots/confusion_matrices/{REF}_pooled_cv_binary_patient.png",
                  f"plots/confusion_matrices/{REF}_fold_0_binary_patient.png"], "Confusion matrix, patient level"),
                ([f"plots/calibration/{REF}_pooled_cv_reliability_patient.png",
                  f"plots/calibration/{REF}_fold_0_reliability_patient.png"], "Reliability diagram (ECE)"),
                ([f"plots/calibration/{REF}_pooled_cv_confidence_patient.png",
                  f"plots/calibration/{REF}_fold_0_confidence_patient.png"], "Confidence distribution"),
                ([f"plots/training_curves/{REF}.png"], "Training curves of every split")],
    "table_2": [([f"plots/roc_curves/{REF}_fixed_patient.png"], "ROC, fixed split, patient level"),
                ([f"plots/confusion_matrices/{REF}_fixed_binary_patient.png"], "Confusion matrix, patient level"),
                ([f"plots/calibration/{REF}_fixed_reliability_patient.png"], "Reliability diagram (ECE)")],
    "table_3": [([f"plots/roc_curves/{REF}_vs_ablations_patient.png"], "Mean ROC against the ablations, patients"),
                ([f"plots/roc_curves/{REF}_vs_ablations_tuple.png"], "Mean ROC against the ablations, tuples")],
    "table_4": [([f"plots/roc_curves/{REF}_vs_baselines_patient.png"], "Mean ROC against the baselines, patients"),
                ([f"plots/roc_curves/{REF}_vs_baselines_tuple.png"], "Mean ROC against the baselines, tuples")],
    "table_4b": [],
    "table_5": [([f"plots/magnification_importance/{REF}_pooled_cv.png",
                  f"plots/magnification_importance/{REF}_fold_0.png"], "Learned magnification importance, CV test tuples"),
                (["plots/magnification_importance/best_model_fixed_test.png"], "Best model, fixed-split test tuples")],
}
TITLES = {"table_1": ("Table 1 · Cross-validation", "cv"), "table_2": ("Table 2 · Fixed split", "fixed"),
          "table_3": ("Table 3 · Ablations", "ablation"), "table_4": ("Table 4 · Baselines", "baseline"),
          "table_4b": ("Table 4b · Student and teacher, fixed split", "baseline"),
          "table_5": ("Table 5 · Per magnification", "magnification")}
STAGE_OF = {"table_1": "cv", "table_2": "fixed", "table_3": "ablations", "table_4": "baselines",
            "table_4b": "fixed,distill", "table_5": "baselines,ablations"}


def table_sections(out, paper, csv_names):
    sections = []
    for key, (title, source) in TITLES.items():
        figures = [facts.first_figure(out, options, caption) for options, caption in FIGURES[key]]
        sections.append(dict(id=key, title=title, table=paper.get(key), figures=[f for f in figures if f],
                             csv=f"tables/{csv_names[source]}", paper=f"tables/paper/{key}",
                             missing=f"no rows: run python main.py --stages {STAGE_OF[key]}"))
    return sections


def efficiency_compact(table):
    if table.empty:
        return None
    out = PaperTable("efficiency", "Efficiency", "Parameters, multiply-accumulates (thop counts MACs; FLOPs = 2 x "
                     "MACs) and median latency of each run's best checkpoint on this machine.",
                     ["Model", "Params (M)", "MACs (G)", "FLOPs (G)", "ms / tuple", "ms / patient", "Device"])
    rows = []
    for r in table.to_dict("records"):
        values = {c: (float(r[k]), False) for c, k in (("Params (M)", "params_m"), ("MACs (G)", "macs_g"),
                                                         ("ms / tuple", "ms_per_tuple"), ("ms / patient", "ms_per_patient"))}
        rows.append(([r["model"], num(r["params_m"], 2), num(r["macs_g"], 3), num(r["flops_g"], 3),
                      num(r["ms_per_tuple"], 1), num(r["ms_per_patient"], 1), str(r["device"])], values))
    return assemble(out, rows)


def subtype_compact(table):
    """Per-class subtype scores of the pooled CV folds (else the fixed split), tuple level, without and with SMOTE."""
    if table.empty:
        return None
    split = next((s for s in ("pooled_cv", "fixed", "fold_0") if s in set(table["split"])), table["split"].iloc[0])
    rows = table[(table["split"] == split) & (table["level"] == "tuple")]
    plain, smote = rows[rows["smote"] == "no"].set_index("subtype"), rows[rows["smote"] == "yes"].set_index("subtype")
    out = PaperTable("subtypes", "Subtypes", f"{REFERENCE} subtype head, {split.replace('_', ' ')} test tuples: "
                     "precision, recall and F1 per grouped subtype without and with feature-space SMOTE.",
                     ["Subtype", "Support", "Precision", "Recall", "F1", "Precision (SMOTE)", "Recall (SMOTE)",
                      "F1 (SMOTE)"])
    cells = []
    for name in plain.index:
        a = plain.loc[name]
        b = smote.loc[name] if name in smote.index else None
        pick = lambda r, k: float(r[k]) if r is not None else np.nan  # noqa: E731
        cells.append(([str(name).replace("_", " "), count(pick(a, "support"))] +
                      [num(pick(a, k)) for k in ("precision", "recall", "f1")] +
                      [num(pick(b, k)) for k in ("precision", "recall", "f1")], {}))
    return assemble(out, cells) if cells else None


def run_pages(out):
    """Training-curve figures of every run."""
    return [dict(src=str(p.relative_to(out)), caption=p.stem) for p in sorted(out.glob("plots/training_curves/*.png"))]


def reference_record(book):
    """The record of the reference model's first run (its CV folds first), or None before any is trained."""
    splits = book.runs.get(REFERENCE, {})
    return next(iter(splits.values()))["record"] if splits else None


def render(context):
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def write_page(cfg, book, tables, paper):
    """output/report.html; returns its path."""
    out = Path(cfg.output_dir)
    csv_groups, run_csvs = facts.csv_groups(out)
    context = dict(
        title="MMNet report", generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        run=facts.run_facts(cfg, out, reference_record(book)), headline=facts.headline(tables, book.rule),
        sections=table_sections(out, paper, TABLE_NAMES), efficiency=efficiency_compact(tables["efficiency"]),
        subtypes=subtype_compact(tables["subtype"]),
        subtype_figures=[f for f in (facts.first_figure(out, [f"plots/confusion_matrices/{REF}_{s}_subtype{t}.png"
                                                              for s in ("pooled_cv", "fixed", "fold_0")], caption)
                                     for t, caption in (("", "Subtype head"), ("_smote", "Subtype head, SMOTE")))
                         if f],
        curves=run_pages(out), tensorboard=facts.tensorboard_runs(out), gallery=facts.gallery(out),
        tuning=facts.tuning(out), csv_groups=csv_groups, run_csvs=run_csvs, notes=list(book.notes),
        reference=REFERENCE,
    )
    path = out / "report.html"
    write_text(path, render(context))
    return path
