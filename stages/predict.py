"""Predict stage: score new patients (folders or image files) with best_model.pth or the CV ensemble."""
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from backbones.our.gradcam import attention_maps, gradcam
from preprocess.transforms import prepare
from preprocess.tuples import eval_batches, eval_tuples, tuple_rows
from stages.engine.checkpoint import load_model, read_checkpoint
from stages.engine.onnx_export import OnnxModel
from stages.engine.predict import amp_settings, predict
from stages.predict_inputs import load_images
from stages.runs import REFERENCE
from utils import plottings as plots
from utils.env import resolve_device
from utils.helpers import PipelineError, log, models_dir, output_path, warn, write_csv
from utils.metrics import binary_metrics

NEEDED = ("model", "model_name", "model_kwargs", "classes", "magnifications", "image_size", "normalization", "threshold")
SHOWN = 20


@dataclass
class Predictor:
    """The models to average and what they share: magnifications, image size, stain normalisation, classes, thresholds."""
    models: list
    mags: tuple
    image_size: int
    stain_norm: bool
    classes: list
    threshold: dict
    source: str
    normalization: dict
    rule: str = "val_youden"


@dataclass
class Scored:
    """New images scored: their index frame and bank, evaluation tuples, patient and image tables, what was not."""
    frame: pd.DataFrame
    bank: object
    tuples: pd.DataFrame | None
    patients: pd.DataFrame | None
    images: pd.DataFrame | None
    problems: list
    left_out: list


def checked(path):
    """The checkpoint at `path` once it is known to carry everything prediction reads."""
    ckpt = read_checkpoint(path)
    missing = [k for k in NEEDED if k not in ckpt]
    if missing:
        raise PipelineError(f"checkpoint {path} lacks {', '.join(missing)}: it comes from an older version of the "
                            f"pipeline. Retrain it (python main.py --stages fixed --force; cv for --ensemble).")
    return ckpt


def loaded(path, ckpt, device):
    """The checkpoint's model, once it normalises inputs as in training (timm's configs change between versions)."""
    model, _ = load_model(path, device)
    want, have = ckpt["normalization"], model.normalization
    if np.allclose(want["mean"], have["mean"]) and np.allclose(want["std"], have["std"]):
        return model
    raise PipelineError(f"checkpoint {path} was trained on inputs normalised with {want}, the model built now uses "
                        f"{have} (another timm version?). Use the versions it was trained with, or retrain it.")


def settings(ckpt):
    norm = tuple(tuple(ckpt["normalization"][k]) for k in ("mean", "std"))
    return (tuple(ckpt["magnifications"]), int(ckpt["image_size"]), bool(ckpt.get("config", {}).get("stain_norm")),
            tuple(ckpt["classes"]["subtype"]), norm)


def checkpoint_paths(cfg):
    if cfg.ensemble and cfg.checkpoint:
        raise PipelineError("--ensemble averages the CV fold models; it cannot be combined with --checkpoint. Drop one.")
    if not cfg.ensemble:
        path = Path(cfg.checkpoint) if cfg.checkpoint else models_dir(cfg) / "best_model.pth"
        if not path.is_file():
            raise PipelineError(f"checkpoint {path} not found. Train it (python main.py --stages fixed) or name "
                                f"another with --checkpoint FILE.")
        return [path]
    folder = models_dir(cfg) / "checkpoints"
    paths = sorted(folder.glob(f"{REFERENCE}_fold_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not paths:
        raise PipelineError(f"no CV fold models in {folder} for --ensemble. Train them: python main.py --stages cv")
    return paths


def load_predictor(cfg, device):
    """best_model.pth, --checkpoint FILE, or the CV fold models (--ensemble) with what they agree on."""
    paths = checkpoint_paths(cfg)
    ckpts = [checked(p) for p in paths]
    shared = {settings(c) for c in ckpts}
    if len(shared) > 1:
        raise PipelineError(f"the models of {', '.join(map(str, paths))} differ in magnifications, image size, "
                            f"stain or input normalisation or classes; an ensemble needs them alike. "
                            f"Retrain them: python main.py --stages cv --force")
    mags, size, stain_norm, classes, (mean, std) = shared.pop()
    models = [loaded(p, c, device) for p, c in zip(paths, ckpts)]
    threshold, rule = decision_of(ckpts)
    source = f"ensemble of {len(paths)} CV models" if cfg.ensemble else str(paths[0])
    return Predictor(models, mags, size, stain_norm, list(classes), threshold, source, dict(mean=mean, std=std), rule)


def decision_of(ckpts):
    """The models' mean thresholds, `decision` the one new patients are decided with, and its rule (checkpoints and
    ONNX metadata from before decision thresholds decide at validation Youden)."""
    threshold = {k: float(np.mean([c["threshold"][k] for c in ckpts])) for k in ("youden", "sens95")}
    threshold["decision"] = float(np.mean([c["threshold"].get("decision", c["threshold"]["youden"]) for c in ckpts]))
    rules = sorted({c.get("threshold_rule", "val_youden") if "decision" in c["threshold"] else "val_youden"
                    for c in ckpts})
    return threshold, rules[0] if len(rules) == 1 else "mean of " + "/".join(rules)


def onnx_predictor(path, threads=0):
    """An exported ONNX graph (one model or an ensemble's mean) with the settings its metadata carries."""
    model = OnnxModel(path, threads)
    m = model.meta
    threshold, rule = decision_of([m])
    return Predictor([model], tuple(m["magnifications"]), int(m["image_size"]), bool(m["stain_norm"]),
                     list(m["classes"]["subtype"]), threshold, f"{path} (onnxruntime)", m["normalization"], rule)


def score(p, frame, bank, batch_size, device, dtype=None, tta=False):
    """Evaluation tuples of every patient with the models' outputs averaged: probability, weights, subtype probs."""
    tuples = eval_tuples(frame, p.mags)
    batches = eval_batches(tuples, p.mags, bank.row_of, p.classes, batch_size)
    runs = [predict(model, bank, batches, device, dtype, tta=tta) for model in p.models]
    tuples["prob_malignant"] = np.mean([r["prob"] for r in runs], 0)
    if tta:
        tuples["prob_malignant_tta"] = np.mean([r["prob_tta"] for r in runs], 0)
    for j, m in enumerate(p.mags):
        tuples[f"w_{m}"] = np.mean([r["mag_weights"][:, j] for r in runs], 0)
    subtype = np.mean([r["subtype_prob"] for r in runs], 0)
    return tuples, subtype


def score_images(p, inputs, batch_size, device, dtype=None, tta=False):
    """The one path from image files to patient decisions (predict stage and service): list and check the files,
    decode them as in training, score every patient's evaluation tuples, build the patient and image tables."""
    frame, bank, problems, left_out = load_images(inputs, p.mags, p.image_size, p.stain_norm, p.classes)
    if frame.empty:
        return Scored(frame, bank, None, None, None, problems, left_out)
    tuples, subtype = score(p, frame, bank, batch_size, device, dtype, tta)
    patients = patient_table(tuples, subtype, frame, p)
    return Scored(frame, bank, tuples, patients, image_table(tuples, frame, problems, left_out, p), problems, left_out)


def decision(prob, threshold):
    return np.where(prob >= threshold, "malignant", "benign")


def patient_table(tuples, subtype, frame, p):
    """One row per patient: images per magnification, mean probability, decisions, subtype, magnification weights."""
    at = tuples.groupby("patient_id", sort=True)
    counts = frame.groupby(["patient_id", "magnification"]).size().unstack(fill_value=0)
    table = counts.reindex(index=at.size().index, columns=list(p.mags), fill_value=0).add_prefix("n_")
    for column in ("prob_malignant", "prob_malignant_tta"):
        if column in tuples:
            table[column] = at[column].mean()
    table["decision"] = decision(table["prob_malignant"], p.threshold["decision"])
    table["decision_high_sensitivity"] = decision(table["prob_malignant"], p.threshold["sens95"])
    table["threshold"], table["threshold_high_sensitivity"] = p.threshold["decision"], p.threshold["sens95"]
    table["threshold_rule"] = p.rule
    sub = pd.DataFrame(subtype, index=tuples["patient_id"]).groupby(level=0).mean().reindex(table.index).to_numpy()
    table["subtype"] = [p.classes[i] for i in sub.argmax(1)] if sub.shape[1] else ""
    table["subtype_prob"] = sub.max(1) if sub.shape[1] else np.nan
    for m in p.mags:
        table[f"weight_{m}"] = at[f"w_{m}"].mean()
    truth = frame.groupby("patient_id").agg(label=("label", "max"), true_subtype=("subtype_group", "first"))
    table["true_class"] = truth["label"].map({0: "benign", 1: "malignant", -1: ""})
    table["true_subtype"] = truth["true_subtype"]
    table["n_tuples"] = at.size()
    return table.reset_index()


def image_table(tuples, frame, problems, left_out, p):
    """Every input file: its patient, magnification, labels, mean probability over the tuples holding it, or why not."""
    used = pd.concat([tuples[[f"path_{m}", "prob_malignant"]].set_axis(["path", "prob"], axis=1) for m in p.mags])
    prob = used[used["path"] != ""].groupby("path")["prob"].agg(["mean", "size"])
    table = frame[["path", "patient_id", "magnification", "class_name", "subtype", "note"]].copy()
    table["prob_malignant"] = table["path"].map(prob["mean"])
    table["n_tuples"] = table["path"].map(prob["size"]).astype("Int64")
    table.insert(1, "status", "scored")
    others = [dict(path=f, status="not scored", note=why) for f, why in problems]
    others += [dict(path=f, status="left out", note=why) for f, why in left_out]
    return pd.concat([table, pd.DataFrame(others)], ignore_index=True) if others else table


def safe(text):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def overlay_title(row, what):
    truth = f", true {row['true_class']}" if row["true_class"] else ""
    return (f"{what} | patient {row['patient_id']}: P(malignant) = {row['prob_malignant']:.3f}, "
            f"{row['decision']} at threshold {row['threshold']:.2f} ({row['threshold_rule']}){truth}")


def explain_batch(p, x, mask):
    """Grad-CAM and spatial attention (None when a model has none) averaged over the models."""
    cams = torch.stack([gradcam(model, x, mask) for model in p.models]).mean(0)
    maps = [attention_maps(model, x, mask)[0] for model in p.models]
    attn = None if any(a is None for a in maps) else torch.stack(maps).mean(0)
    return cams.cpu().numpy(), None if attn is None else attn.cpu().numpy()


def overlays(p, tuples, patients, bank, folder, device, batch_size):
    """Per patient one Grad-CAM and one attention figure of its first tuple, a panel per magnification."""
    first = tuples.drop_duplicates("patient_id").set_index("patient_id").loc[patients["patient_id"]].reset_index()
    used = [any(j in m.used_mags for m in p.models) for j in range(len(p.mags))]
    shutil.rmtree(folder, ignore_errors=True)
    for start in range(0, len(first), batch_size):
        part = first.iloc[start:start + batch_size]
        images, mask = bank.gather(tuple_rows(part, p.mags, bank.row_of), device)
        x, mask = prepare(images, mask, device, **p.normalization)
        cams, attn = explain_batch(p, x, mask)
        images, mask = images.cpu().numpy(), mask.cpu().tolist()
        for i, row in enumerate(patients.iloc[start:start + batch_size].to_dict("records")):
            stem = safe(row["patient_id"])
            captions = [f"weight {row[f'weight_{m}']:.2f}" if mask[i][j] else "" for j, m in enumerate(p.mags)]
            plots.overlay_panels(images[i], cams[i], mask[i], used, p.mags, overlay_title(row, "Grad-CAM"),
                                 folder / f"{stem}_gradcam.png", "Grad-CAM (scaled per image)", captions)
            if attn is not None:
                plots.overlay_panels(images[i], attn[i], mask[i], used, p.mags, overlay_title(row, "Spatial attention"),
                                     folder / f"{stem}_attention.png", "attention (scaled per image)", captions)


def run_name(cfg):
    first = Path(cfg.input[0]).resolve()
    name = safe(first.stem if first.is_file() else first.name) or "input"
    more = f"_and_{len(cfg.input) - 1}_more" if len(cfg.input) > 1 else ""
    model = "ensemble" if cfg.ensemble else safe(Path(cfg.checkpoint or "best_model.pth").stem)
    return f"{name}{more}_{model}"


def summary(p, patients, n_images, folder):
    """The console lines: what was scored, the first patients, accuracy where names carry labels."""
    log(f"Scored {len(patients)} patient(s) from {n_images} image(s) with {p.source} "
        f"(decision threshold {p.threshold['decision']:.3f}, {p.rule}; high sensitivity {p.threshold['sens95']:.3f}, "
        f"from validation)")
    columns = ["patient_id", *[f"n_{m}" for m in p.mags], "prob_malignant", "decision", "decision_high_sensitivity",
               "subtype", "subtype_prob", "true_class"]
    log(patients[columns].head(SHOWN).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(patients) > SHOWN:
        log(f"... {len(patients) - SHOWN} more in patients.csv")
    known = patients[patients["true_class"] != ""]
    if len(known):
        m = binary_metrics(known["true_class"].eq("malignant"), known["prob_malignant"], p.threshold["decision"])
        log(f"File names carry labels for {len(known)} patient(s): accuracy {m['accuracy']:.3f}, sensitivity "
            f"{m['recall']:.3f}, specificity {m['specificity']:.3f}, AUC {m['auc']:.3f} at the decision threshold")
    log(f"-> {folder}: patients.csv, images.csv, overlays/")


def problem_text(problems):
    listed = "; ".join(f"{path}: {why}" for path, why in problems[:5])
    return listed + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")


def run_predict(cfg):
    """Stage: malignant probability, decisions, subtype and overlays for every patient in --input."""
    if not cfg.input:
        raise PipelineError("the predict stage needs --input PATH: a folder of images (any layout analyze accepts, "
                            "or flat) or image files, comma-separated. Example: python main.py --input new_patients/")
    device = resolve_device(cfg.device)
    p = load_predictor(cfg, device)
    dtype, _ = amp_settings(cfg, device)
    scored = score_images(p, cfg.input, cfg.batch_size, device, dtype, cfg.tta)
    problems, frame = scored.problems, scored.frame
    for path, why in problems:
        warn(f"{path}: {why}; not scored")
    for path, why in scored.left_out:
        warn(f"{path}: {why}; left out")
    if frame.empty:
        raise PipelineError(f"nothing to score in {', '.join(cfg.input)}: {problem_text(problems + scored.left_out)}. "
                            f"Give image files or folders of them (.png as in BreakHis).")
    own = frame[frame["label"] < 0]
    if len(own):
        warn(f"{len(own)} file(s) without a BreakHis name (e.g. {own['file'].iloc[0]}) are each their own patient, "
             f"at the magnification of their folder or else {p.mags[0]} (see the note column of images.csv)")
    folder = output_path(cfg, "predictions", run_name(cfg))
    write_csv(scored.patients, folder / "patients.csv", index=False)
    write_csv(scored.images, folder / "images.csv", index=False)
    plots.setup_style()
    overlays(p, scored.tuples, scored.patients, scored.bank, folder / "overlays", device, cfg.batch_size)
    summary(p, scored.patients, len(frame), folder)
    if problems:
        raise PipelineError(f"{len(problems)} input(s) were not scored ({problem_text(problems)}); the other "
                            f"patients are in {folder}. Fix or remove those files.")
