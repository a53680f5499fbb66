"""The report page: output/report.html, one self-contained file rendered by Jinja2 from the tables and plots."""
import datetime
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from stages.report import facts
from stages.training.runs import REFERENCE
from utils.helpers import num, write_text
from stages.report.paper import PaperTable, assemble, count
from stages.report.registry import TABLE_NAMES, TABLES, paper_key

TEMPLATES = Path(__file__).resolve().parent / "templates"
REF = REFERENCE


def table_sections(out, paper):
    """One page section per registered table with a title: its paper table, figures and files."""
    sections = []
    for table in (t for t in TABLES if t.title):
        key = paper_key(table)
        figures = [facts.first_figure(out, options, caption) for options, caption in table.figures]
        sections.append(dict(id=key, title=table.title, table=paper.get(key), figures=[f for f in figures if f],
                             csv=f"tables/{TABLE_NAMES[table.wide]}", paper=f"tables/paper/{key}",
                             missing=f"no rows: run python main.py --stages {table.stage}"))
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
        sections=table_sections(out, paper), efficiency=efficiency_compact(tables["efficiency"]),
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
