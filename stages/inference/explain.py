"""Explain stage: Grad-CAM, spatial attention and magnification importance of best_model.pth on fixed-split test
tuples, each map laid over the whole field at its own aspect."""
import numpy as np
import pandas as pd

from backbones.our.gradcam import attention_maps, gradcam
from preprocess.cache import cache_folder
from preprocess.transforms import prepare
from preprocess.tuples import eval_tuples, image_bank, slot_labels, tuple_rows
from stages.training.checkpoint import load_model
from stages.training.data import split_frames
from stages.training.evaluate import predict_all
from stages.training.runs import REFERENCE
from utils import plottings as plots
from utils.env import resolve_device
from utils.helpers import (PipelineError, RunFiles, log, models_dir, plots_dir, read_json_or_none, require, runs_dir,
                           safe_name, write_csv)
from utils.scoring import threshold_of


def tuple_threshold(cfg, ckpt):
    """The tuple-level threshold of the rule best_model.pth was trained under, from its fixed-split run (whose
    validation tuples fitted it); 0.5 without that run."""
    metrics = read_json_or_none(RunFiles(runs_dir(cfg) / REFERENCE / "fixed").metrics)
    if metrics is None:
        return 0.5
    return threshold_of(metrics["threshold"]["tuple"], ckpt["threshold_rule"]) or 0.5



def pick_samples(frame, threshold, per_cell):
    """Up to per_cell tuples per (class, correct/wrong), most confident first, one per patient where possible."""
    frame = frame.assign(pred=(frame["prob_malignant"] >= threshold).astype(int), threshold=threshold)
    frame["correct"] = frame["pred"] == frame["label"]
    frame["confidence"] = np.where(frame["pred"] == 1, frame["prob_malignant"], 1 - frame["prob_malignant"])
    picks, empty = [], []
    for label, cls in enumerate(plots.CLASS_NAMES):
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
    return (f"{what} | true {plots.CLASS_NAMES[int(row['label'])]}, predicted {plots.CLASS_NAMES[int(row['pred'])]} "
            f"(P(malignant) = {row['prob_malignant']:.3f}, threshold {row['threshold']:.2f}, {verdict})\n"
            f"patient {row['patient_id']}, tuple {row['tuple_id']}")


def explain_figures(cfg, model, picks, mags, bank, device):
    """Grad-CAM and spatial-attention figures of the picked tuples (whole fields); returns the file list."""
    used = [j in set(model.used_mags) for j in range(len(mags))]
    images, mask = bank.gather(tuple_rows(picks, mags, bank.row_of), device)
    x, mask = prepare(images, mask, device, **model.normalization)
    images = images.cpu()
    labels = slot_labels(mags)
    cams = gradcam(model, x.to(device), mask.to(device)).cpu().numpy()
    attn, out = attention_maps(model, x.to(device), mask.to(device))
    weights = out["mag_weights"].float().cpu().numpy()
    if attn is None:
        log("explain: this model has no spatial attention maps; attention_maps/ is left empty")
    rows = []
    for i, row in enumerate(picks.to_dict("records")):
        stem = f"{row['category']}_{row['rank']}_{safe_name(row['patient_id'], '-_')}"
        captions = [f"CMF weight {w:.2f}" if m else "" for w, m in zip(weights[i], mask[i].tolist())]
        target = plots.CLASS_NAMES[int(row["pred"])]
        gc = plots.overlay_panels(images[i].numpy(), cams[i], mask[i].tolist(), used, labels,
                              sample_title(row, f"Grad-CAM for '{target}'"), plots_dir(cfg) / "gradcam" / f"{stem}.png",
                              "Grad-CAM (scaled per image)", captions)
        at = None
        if attn is not None:
            at = plots.overlay_panels(images[i].numpy(), attn[i].cpu().numpy(), mask[i].tolist(), used, labels,
                                  sample_title(row, "Spatial attention"),
                                  plots_dir(cfg) / "attention_maps" / f"{stem}.png",
                                  "attention (scaled per image)", captions)
        rows.append(dict(category=row["category"], patient_id=row["patient_id"], tuple_id=row["tuple_id"],
                         label=int(row["label"]), pred=int(row["pred"]), prob_malignant=row["prob_malignant"],
                         gradcam=relative(cfg, gc), attention_map=relative(cfg, at), note=""))
    return rows


def relative(cfg, path):
    return str(path.relative_to(plots_dir(cfg))) if path else ""



def run_explain(cfg):
    """Stage: Grad-CAM, spatial attention and magnification importance of best_model.pth on fixed-split test tuples."""
    path = require(models_dir(cfg) / "best_model.pth", "fixed")
    plots.setup_style()
    device = resolve_device(cfg.device)
    model, ckpt = load_model(path, device)
    mags, classes = tuple(ckpt["magnifications"]), list(ckpt["classes"]["subtype"])
    index, parts = split_frames(cfg, "fixed")
    tuples = eval_tuples(parts["test"], mags, tuple(ckpt["pool"]))
    if tuples.empty:
        raise PipelineError("the fixed split has no test tuples to explain. "
                            "Rerun: python main.py --stages split,fixed,explain")
    threshold = tuple_threshold(cfg, ckpt)
    bank = image_bank(index["path"].astype(str).tolist(), tuple(ckpt["field"]), bool(ckpt["config"]["stain_norm"]),
                      cache_folder(cfg))
    frame = predict_all(model, tuples, mags, classes, bank, device, cfg.batch_size, bool(ckpt["config"]["tta"]))
    plots.importance_plot(frame, mags, "Best model: magnification importance on the fixed-split test tuples",
                          plots_dir(cfg) / "magnification_importance" / "best_model_fixed_test.png")
    picks, empty = pick_samples(frame, threshold, cfg.explain_samples)
    rows = explain_figures(cfg, model, picks, mags, bank, device) if len(picks) else []
    for kind in empty:
        cls, verdict = kind.split("_")
        rows.append(dict(category=kind, note=f"no {verdict} predictions for true {cls} tuples in the fixed test set"))
        log(f"explain: no {verdict} predictions for true {cls} tuples in the fixed test set (threshold {threshold:.3f})")
    listing = pd.DataFrame(rows).astype({"label": "Int64", "pred": "Int64"})
    for folder in ("gradcam", "attention_maps"):
        (plots_dir(cfg) / folder).mkdir(parents=True, exist_ok=True)
        write_csv(listing, plots_dir(cfg) / folder / "index.csv", index=False)
    log(f"Explained {len(picks)} test tuples (threshold {threshold:.3f}, {cfg.explain_samples} per class x correct/wrong) "
        f"-> {plots_dir(cfg) / 'gradcam'}, {plots_dir(cfg) / 'attention_maps'}")

