"""Report plots: confusion matrices, calibration, magnification importance, ROC curves and training curves."""
import pandas as pd

from stages.training.runs import REFERENCE
from utils import plottings as plots
from utils import scoring
from utils.helpers import plots_dir


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
