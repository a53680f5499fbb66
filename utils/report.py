"""Report and explain stages: tables and plots rebuilt from output/runs, Grad-CAM and attention maps of the best model."""
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from utils import plottings as P
from utils import tables as T
from utils.helpers import PipelineError, log, models_dir, plots_dir, require, runs_dir, tables_dir

TRAINING_STAGES = "cv,fixed,baselines,ablations"


def write_notes(cfg, notes):
    path = tables_dir(cfg) / "report_notes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(notes) + "\n" if notes else "every expected run was found\n")
    for note in notes:
        log(f"note: {note}")


def run_report(cfg):
    """Stage: every table and plot from the run folders, without retraining."""
    runs = T.load_runs(cfg)
    if not runs:
        raise PipelineError(f"no finished runs under {runs_dir(cfg)}. "
                            f"Train first: python main.py --stages {TRAINING_STAGES}")
    P.setup_style()
    notes = []
    log(f"Runs found: {', '.join(f'{name} ({len(splits)} splits)' for name, splits in runs.items())}")
    efficiency = T.efficiency_table(cfg, runs, notes)
    tables = dict(
        cv=T.cv_table(runs, cfg, notes), fixed=T.fixed_table(runs, cfg, notes),
        ablation=T.ablation_table(runs, cfg, notes, efficiency), baseline=T.baseline_table(runs, cfg, notes, efficiency),
        magnification=T.magnification_table(runs, cfg, notes), subtype=T.subtype_table(runs, notes), efficiency=efficiency,
    )
    for key, table in tables.items():
        T.write_table(cfg, key, table)
    write_plots(cfg, runs, notes)
    write_notes(cfg, notes)
    log(f"Tables -> {tables_dir(cfg)}, plots -> {plots_dir(cfg)}")


def pooled_frames(splits, names, level, rule="val_youden"):
    return pd.concat([T.scored_frame(splits[s], level, rule) for s in names], ignore_index=True)


def reference_parts(runs):
    """{name: test frames provider} for mmnet: each split, plus the CV folds pooled."""
    splits = runs.get(T.REFERENCE, {})
    parts = {s: [s] for s in splits}
    folds = T.cv_splits(splits)
    if len(folds) > 1:
        parts["pooled_cv"] = folds
    return splits, parts


def summary_parts(parts):
    """The pooled CV folds (or the only fold) and the fixed split."""
    keep = [n for n in ("pooled_cv", "fixed") if n in parts]
    folds = [n for n in parts if n.startswith("fold_")]
    return keep + folds if len(folds) == 1 else keep


def write_plots(cfg, runs, notes):
    splits, parts = reference_parts(runs)
    if not splits:
        notes.append("plots: no mmnet run; confusion matrices, ROC, calibration and CMF plots left out.")
    summary = summary_parts(parts)
    for name, members in parts.items():
        confusion_plots(cfg, splits, name, members, smote=name in summary)
    for name in summary:
        members = parts[name]
        calibration_plots(cfg, splits, name, members)
        importance_plot(cfg, pd.concat([T.level_frame(splits[s]["pred"], "tuple", "test") for s in members]),
                        cfg.magnifications, f"MMNet learned magnification importance, {name} test tuples",
                        plots_dir(cfg) / "magnification_importance" / f"mmnet_{name}.png")
    roc_plots(cfg, runs, splits)
    for name, run_splits in runs.items():
        histories = {s: r["history"] for s, r in run_splits.items() if r["history"] is not None and len(r["history"])}
        if histories:
            P.training_curves(histories, f"{name}: training curves", plots_dir(cfg) / "training_curves" / f"{name}.png")


def confusion_plots(cfg, splits, name, members, smote=True):
    folder = plots_dir(cfg) / "confusion_matrices"
    for level in T.LEVELS:
        frame = pooled_frames(splits, members, level)
        if frame.empty:
            continue
        pred = (frame["prob_malignant"] >= frame["thr"]).astype(int)
        rule = f"threshold {frame['thr'].iloc[0]:.3f}" if frame["thr"].nunique() == 1 else "per-fold thresholds"
        P.confusion(frame["label"].astype(int), pred, list(P.CLASS_NAMES),
                    f"MMNet {name}, {level} level\n(validation Youden, {rule})",
                    folder / f"mmnet_{name}_binary_{level}.png")
    classes = splits[members[0]]["classes"]
    heads = (("subtype_pred", "subtype"), ("subtype_pred_smote", "subtype_smote"))[: 2 if smote else 1]
    for column, tag in heads:
        frame = pd.concat([T.subtype_frame(splits[s], "tuple") for s in members])
        if column not in frame or frame[column].isna().all() or not classes:
            continue
        frame = frame[frame["subtype_label"].isin(classes) & frame[column].isin(classes)]
        index = {c: i for i, c in enumerate(classes)}
        head = "subtype head on SMOTE-balanced embeddings" if tag == "subtype_smote" else "subtype head"
        P.confusion(frame["subtype_label"].map(index), frame[column].map(index), [c.replace("_", " ") for c in classes],
                    f"MMNet {name}, tuple level, {head}", folder / f"mmnet_{name}_{tag}.png")


def calibration_plots(cfg, splits, name, members):
    folder = plots_dir(cfg) / "calibration"
    for level in T.LEVELS:
        frame = pooled_frames(splits, members, level)
        if frame.empty:
            continue
        P.reliability(frame["label"], frame["prob_malignant"], f"MMNet {name}, {level} level: reliability",
                      folder / f"mmnet_{name}_reliability_{level}.png")
        thr = frame["thr"].to_numpy()
        P.confidence_distribution(frame["label"], frame["prob_malignant"], thr,
                                  f"MMNet {name}, {level} level: confidence",
                                  folder / f"mmnet_{name}_confidence_{level}.png")


def roc_plots(cfg, runs, splits):
    folder = plots_dir(cfg) / "roc_curves"
    folds = T.cv_splits(splits)
    for level in T.LEVELS:
        for tag, names in (("cv", folds), ("fixed", [s for s in splits if s == "fixed"])):
            curves = [(s, *xy(T.scored_frame(splits[s], level, "fixed_0.5"))) for s in names]
            if curves:
                P.roc_folds(curves, f"MMNet {tag}, {level} level ROC", folder / f"mmnet_{tag}_{level}.png")
        for tag, names in (("ablations", T.ablation_names(cfg)), ("baselines", T.baseline_names(cfg))):
            models = {}
            for name in [T.REFERENCE] + names:
                shared = T.shared_splits(runs[name], splits) if name in runs and splits else []
                models[name] = [xy(T.scored_frame(runs[name][s], level, "fixed_0.5")) for s in shared]
            models = {k: v for k, v in models.items() if v}
            if len(models) > 1:
                P.roc_models(models, f"MMNet vs {tag}, {level} level\nmean ROC over the folds each shares with MMNet",
                             folder / f"mmnet_vs_{tag}_{level}.png")


def xy(frame):
    return frame["label"].to_numpy().astype(int), frame["prob_malignant"].to_numpy(dtype=float)


def weight_tidy(frame, mags):
    """Long table (kind, magnification, class, weight) of CMF and HMA weights over present magnifications."""
    rows = []
    for kind, prefix in (("CMF importance", "w"), ("HMA level weight", "hma")):
        for mag in mags:
            col = f"{prefix}_{mag}"
            if col not in frame or frame[col].isna().all():
                continue
            present = frame[frame[f"mask_{mag}"] == 1] if f"mask_{mag}" in frame else frame
            for label, weight in zip(present["label"].astype(int), present[col].astype(float)):
                rows.append((kind, mag, "all", weight))
                rows.append((kind, mag, P.CLASS_NAMES[label], weight))
    return pd.DataFrame(rows, columns=["kind", "magnification", "class", "weight"])


def importance_plot(cfg, frame, mags, title, path):
    tidy = weight_tidy(frame, mags)
    if tidy.empty:
        return None
    return P.magnification_weights(tidy, title, path)


def fixed_threshold(cfg):
    """The validation Youden threshold of the fixed mmnet run (tuple level), else 0.5."""
    folder = runs_dir(cfg) / T.REFERENCE / "fixed"
    if not (folder / "predictions.csv").exists():
        return 0.5
    return T.threshold(T.load_run(folder), "val_youden")


def test_tuples(cfg, mags):
    from preprocess.tuples import eval_tuples
    from utils.experiments import split_frames
    _, parts = split_frames(cfg, "fixed")
    return eval_tuples(parts["test"], mags)


def predict_all(cfg, model, tuples, device, batch=32):
    """Malignant probability and CMF/HMA weights of every tuple, in batches."""
    from preprocess.tuples import load_tuple_images
    probs, weights, hma, masks = [], [], [], []
    for start in range(0, len(tuples), batch):
        x, mask = load_tuple_images(cfg, tuples.iloc[start:start + batch])
        with torch.no_grad():
            out = model(x.to(device), mask.to(device))
        probs.append(out["binary_logits"].float().sigmoid().cpu())
        weights.append(out["mag_weights"].float().cpu())
        none = torch.full_like(weights[-1], float("nan"))
        hma.append(none if out["hma_weights"] is None else out["hma_weights"].float().cpu())
        masks.append(mask)
    frame = tuples.copy()
    frame["prob_malignant"] = torch.cat(probs).numpy()
    for j, mag in enumerate(cfg.magnifications):
        frame[f"w_{mag}"] = torch.cat(weights)[:, j].numpy()
        frame[f"hma_{mag}"] = torch.cat(hma)[:, j].numpy()
        frame[f"mask_{mag}"] = torch.cat(masks)[:, j].numpy().astype(int)
    return frame


def pick_samples(frame, threshold, per_cell):
    """Up to per_cell tuples per (class, correct/wrong), most confident first, one per patient where possible."""
    frame = frame.assign(pred=(frame["prob_malignant"] >= threshold).astype(int), threshold=threshold)
    frame["correct"] = frame["pred"] == frame["label"]
    frame["confidence"] = np.where(frame["pred"] == 1, frame["prob_malignant"], 1 - frame["prob_malignant"])
    picks, empty = [], []
    for label, cls in enumerate(P.CLASS_NAMES):
        for correct in (True, False):
            cell = frame[(frame["label"] == label) & (frame["correct"] == correct)]
            cell = cell.sort_values("confidence", ascending=False)
            first = cell.drop_duplicates("patient_id")
            chosen = pd.concat([first, cell.drop(first.index)]).head(per_cell)
            kind = f"{cls}_{'correct' if correct else 'wrong'}"
            if chosen.empty:
                empty.append(kind)
            picks.append(chosen.assign(category=kind, rank=range(len(chosen))))
    return pd.concat(picks), empty


def sample_title(row, what):
    verdict = "correct" if row["correct"] else "WRONG"
    return (f"{what} | true {P.CLASS_NAMES[int(row['label'])]}, predicted {P.CLASS_NAMES[int(row['pred'])]} "
            f"(P(malignant) = {row['prob_malignant']:.3f}, validation threshold {row['threshold']:.2f}, {verdict})\n"
            f"patient {row['patient_id']}, tuple {row['tuple_id']}")


def explain_figures(cfg, model, picks, device):
    """Grad-CAM and spatial-attention figures of the picked tuples; returns the file list."""
    from backbones.our.gradcam import attention_maps, gradcam
    from preprocess.tuples import load_tuple_images
    mags = list(cfg.magnifications)
    used = [j in set(model.used_mags) for j in range(len(mags))]
    x, mask = load_tuple_images(cfg, picks)
    images, _ = load_tuple_images(cfg, picks, normalize=False)
    cams = gradcam(model, x.to(device), mask.to(device)).cpu().numpy()
    attn, out = attention_maps(model, x.to(device), mask.to(device))
    weights = out["mag_weights"].float().cpu().numpy()
    if attn is None:
        log("explain: this model has no spatial attention maps; attention_maps/ is left empty")
    rows = []
    for i, row in enumerate(picks.to_dict("records")):
        stem = f"{row['category']}_{row['rank']}_{safe(row['patient_id'])}"
        captions = [f"CMF weight {w:.2f}" if m else "" for w, m in zip(weights[i], mask[i].tolist())]
        target = P.CLASS_NAMES[int(row["pred"])]
        gc = P.overlay_panels(images[i].numpy(), cams[i], mask[i].tolist(), used, mags,
                              sample_title(row, f"Grad-CAM for '{target}'"), plots_dir(cfg) / "gradcam" / f"{stem}.png",
                              "Grad-CAM (scaled per image)", captions)
        at = None
        if attn is not None:
            at = P.overlay_panels(images[i].numpy(), attn[i].cpu().numpy(), mask[i].tolist(), used, mags,
                                  sample_title(row, "Spatial attention"),
                                  plots_dir(cfg) / "attention_maps" / f"{stem}.png",
                                  "attention (scaled per image)", captions)
        rows.append(dict(category=row["category"], patient_id=row["patient_id"], tuple_id=row["tuple_id"],
                         label=int(row["label"]), pred=int(row["pred"]), prob_malignant=row["prob_malignant"],
                         gradcam=relative(cfg, gc), attention_map=relative(cfg, at), note=""))
    return rows


def relative(cfg, path):
    return str(path.relative_to(plots_dir(cfg))) if path else ""


def safe(text):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))


def run_explain(cfg):
    """Stage: Grad-CAM, spatial attention and magnification importance of best_model.pth on fixed-split test tuples."""
    from utils.env import resolve_device
    from utils.trainer import load_model
    path = require(models_dir(cfg) / "best_model.pth", "fixed")
    P.setup_style()
    device = resolve_device(cfg.device)
    model, ckpt = load_model(path, device)
    cfg = replace(cfg, magnifications=tuple(ckpt["magnifications"]), image_size=int(ckpt["image_size"]))
    tuples = test_tuples(cfg, cfg.magnifications)
    if tuples.empty:
        raise PipelineError("the fixed split has no test tuples to explain. "
                            "Rerun: python main.py --stages split,fixed,explain")
    threshold = fixed_threshold(cfg)
    frame = predict_all(cfg, model, tuples, device)
    importance_plot(cfg, frame, cfg.magnifications, "Best model: magnification importance on the fixed-split test tuples",
                    plots_dir(cfg) / "magnification_importance" / "best_model_fixed_test.png")
    picks, empty = pick_samples(frame, threshold, cfg.explain_samples)
    rows = explain_figures(cfg, model, picks, device) if len(picks) else []
    for kind in empty:
        cls, verdict = kind.split("_")
        rows.append(dict(category=kind, note=f"no {verdict} predictions for true {cls} tuples in the fixed test set"))
        log(f"explain: no {verdict} predictions for true {cls} tuples in the fixed test set (threshold {threshold:.3f})")
    listing = pd.DataFrame(rows).astype({"label": "Int64", "pred": "Int64"})
    for folder in ("gradcam", "attention_maps"):
        (plots_dir(cfg) / folder).mkdir(parents=True, exist_ok=True)
        listing.to_csv(plots_dir(cfg) / folder / "index.csv", index=False)
    log(f"Explained {len(picks)} test tuples (threshold {threshold:.3f}, {cfg.explain_samples} per class x correct/wrong) "
        f"-> {plots_dir(cfg) / 'gradcam'}, {plots_dir(cfg) / 'attention_maps'}")
