"""Report stage: every table and plot rebuilt from output/runs, without retraining."""
import pandas as pd

from stages.efficiency import efficiency_table
from stages.runs import REFERENCE, magnification_runs, table_runs
from utils import plottings as plots
from utils import scoring
from utils.helpers import PipelineError, log, plots_dir, runs_dir, tables_dir, write_text
from utils.tables import Book, ablation_table, baseline_table, cv_table, fixed_table, magnification_table, subtype_table
from utils.tables import write_table

TRAINING_STAGES = "cv,fixed,baselines,ablations"


def write_notes(cfg, notes):
    text = "\n".join(notes) + "\n" if notes else "every expected run was found\n"
    write_text(tables_dir(cfg) / "report_notes.txt", text)
    for note in notes:
        log(f"note: {note}")



def book_of(cfg, runs):
    listed = {table: table_runs(cfg, table) for table in ("ablation", "baseline")}
    by_mag = {m: magnification_runs(cfg, m) for m in cfg.magnifications}
    return Book(runs, REFERENCE, listed, by_mag, cfg.bootstrap, cfg.seed, rule=cfg.threshold_rule)


def run_report(cfg):
    """Stage: every table and plot from the run folders, without retraining."""
    runs = scoring.load_runs(runs_dir(cfg))
    if not runs:
        raise PipelineError(f"no finished runs under {runs_dir(cfg)}. "
                            f"Train first: python main.py --stages {TRAINING_STAGES}")
    plots.setup_style()
    book = book_of(cfg, runs)
    log(f"Runs found: {', '.join(f'{name} ({len(splits)} splits)' for name, splits in runs.items())}")
    efficiency = efficiency_table(cfg, runs, book.notes)
    tables = dict(cv=cv_table(book), fixed=fixed_table(book), ablation=ablation_table(book, efficiency),
                  baseline=baseline_table(book, efficiency), magnification=magnification_table(book),
                  subtype=subtype_table(book), efficiency=efficiency)
    for key, table in tables.items():
        write_table(cfg, key, table)
    write_plots(cfg, book)
    write_notes(cfg, book.notes)
    log(f"Tables -> {tables_dir(cfg)}, plots -> {plots_dir(cfg)}")



def reference_parts(runs):
    """{name: split names} of the reference: each split, plus the CV folds pooled."""
    splits = runs.get(REFERENCE, {})
    parts = {s: [s] for s in splits}
    folds = scoring.cv_splits(splits)
    if len(folds) > 1:
        parts["pooled_cv"] = folds
    return splits, parts


def summary_parts(parts):
    """The pooled CV folds (or the only fold) and the fixed split."""
    keep = [n for n in ("pooled_cv", "fixed") if n in parts]
    folds = [n for n in parts if n.startswith("fold_")]
    return keep + folds if len(folds) == 1 else keep


def write_plots(cfg, book):
    runs, notes = book.runs, book.notes
    splits, parts = reference_parts(runs)
    if not splits:
        notes.append(f"plots: no {REFERENCE} run; confusion matrices, ROC, calibration and CMF plots left out.")
    summary = summary_parts(parts)
    if splits and len(next(iter(splits.values()))["classes"]) < 2:
        notes.append("plots: subtype confusion matrices left out; the subtype head has one class (n/a).")
    for name, members in parts.items():
        confusion_plots(cfg, splits, name, members, smote=name in summary)
    for name in summary:
        members = parts[name]
        calibration_plots(cfg, splits, name, members)
        frame = pd.concat([scoring.level_frame(splits[s]["pred"], "tuple", "test") for s in members])
        plots.importance_plot(frame, cfg.magnifications, f"MMNet learned magnification importance, {name} test tuples",
                              plots_dir(cfg) / "magnification_importance" / f"{REFERENCE}_{name}.png")
    roc_plots(cfg, book, splits)
    for name, run_splits in runs.items():
        histories = {s: r["history"] for s, r in run_splits.items() if r["history"] is not None and len(r["history"])}
        if histories:
            plots.training_curves(histories, f"{name}: training curves", plots_dir(cfg) / "training_curves" / f"{name}.png")


def confusion_plots(cfg, splits, name, members, smote=True):
    folder = plots_dir(cfg) / "confusion_matrices"
    rule = cfg.threshold_rule if scoring.has_rule({s: splits[s] for s in members}, cfg.threshold_rule) else "val_youden"
    for level in scoring.LEVELS:
        frame = scoring.pooled_frames(splits, members, level, rule)
        if frame.empty:
            continue
        pred = (frame["prob_malignant"] >= frame["thr"]).astype(int)
        where = f"threshold {frame['thr'].iloc[0]:.3f}" if frame["thr"].nunique() == 1 else "per-fold thresholds"
        plots.confusion(frame["label"].astype(int), pred, list(plots.CLASS_NAMES),
                    f"MMNet {name}, {level} level\n({rule}, {where})",
                    folder / f"{REFERENCE}_{name}_binary_{level}.png")
    classes = splits[members[0]]["classes"]
    heads = (("subtype_pred", "subtype"), ("subtype_pred_smote", "subtype_smote"))[: 2 if smote else 1]
    for column, tag in heads:
        frame = pd.concat([scoring.subtype_frame(splits[s], "tuple") for s in members])
        if column not in frame or frame[column].isna().all() or len(classes) < 2:
            continue
        frame = frame[frame["subtype_label"].isin(classes) & frame[column].isin(classes)]
        index = {c: i for i, c in enumerate(classes)}
        head = "subtype head on SMOTE-balanced embeddings" if tag == "subtype_smote" else "subtype head"
        plots.confusion(frame["subtype_label"].map(index), frame[column].map(index), [c.replace("_", " ") for c in classes],
                    f"MMNet {name}, tuple level, {head}", folder / f"{REFERENCE}_{name}_{tag}.png")


def calibration_plots(cfg, splits, name, members):
    folder = plots_dir(cfg) / "calibration"
    for level in scoring.LEVELS:
        frame = scoring.pooled_frames(splits, members, level)
        if frame.empty:
            continue
        plots.reliability(frame["label"], frame["prob_malignant"], f"MMNet {name}, {level} level: reliability",
                      folder / f"{REFERENCE}_{name}_reliability_{level}.png")
        thr = frame["thr"].to_numpy()
        plots.confidence_distribution(frame["label"], frame["prob_malignant"], thr,
                                  f"MMNet {name}, {level} level: confidence",
                                  folder / f"{REFERENCE}_{name}_confidence_{level}.png")


def roc_plots(cfg, book, splits):
    runs = book.runs
    folder = plots_dir(cfg) / "roc_curves"
    folds = scoring.cv_splits(splits)
    for level in scoring.LEVELS:
        for tag, names in (("cv", folds), ("fixed", [s for s in splits if s == "fixed"])):
            curves = [(s, *xy(scoring.scored_frame(splits[s], level, "fixed_0.5"))) for s in names]
            if curves:
                plots.roc_folds(curves, f"MMNet {tag}, {level} level ROC", folder / f"{REFERENCE}_{tag}_{level}.png")
        for tag, table in (("ablations", "ablation"), ("baselines", "baseline")):
            models = {}
            for name in [REFERENCE] + book.listed[table]:
                shared = scoring.shared_splits(runs[name], splits) if name in runs and splits else []
                models[name] = [xy(scoring.scored_frame(runs[name][s], level, "fixed_0.5")) for s in shared]
            models = {k: v for k, v in models.items() if v}
            if len(models) > 1:
                plots.roc_models(models, f"MMNet vs {tag}, {level} level\nmean ROC over the folds each shares with MMNet",
                             folder / f"{REFERENCE}_vs_{tag}_{level}.png")


def xy(frame):
    return frame["label"].to_numpy().astype(int), frame["prob_malignant"].to_numpy(dtype=float)
