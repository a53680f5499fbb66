"""The models behind a prediction (checkpoints, the CV fold ensemble, an ONNX graph) and the one path from image files
to patient decisions, shared by the predict stage, export and the service."""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch

from backbones import magnifications_read
from preprocess.tuples import ANY, eval_batches, eval_tuples, slot_labels
from stages.inference.inputs import load_images
from stages.training.checkpoint import load_model, read_checkpoint
from stages.training.forward import predict
from stages.training.runs import REFERENCE
from utils.helpers import PipelineError

NEEDED = ("model", "model_name", "model_kwargs", "classes", "magnifications", "pool", "image_size", "field",
          "normalization", "threshold", "threshold_rule", "config", "record")
INPUTS = ("images", "mask")
OUTPUTS = ("prob_malignant", "subtype_prob", "mag_weights")
META = ("model_name", "source", "members", "classes", "magnifications", "pool", "reads", "image_size", "field",
        "normalization", "threshold", "threshold_rule", "stain_norm", "tta", "runs", "parity")


@dataclass
class Predictor:
    """The models to average and what they share: input slots (`mags`), the run's magnifications an 'any' slot draws
    from (`pool`), those the models read, image size and whole-field shape, stain normalisation and test-time
    augmentation as in training, classes, patient-level thresholds and their rule."""
    models: list
    mags: tuple
    pool: tuple
    reads: tuple
    image_size: int
    field: tuple
    stain_norm: bool
    tta: bool
    classes: list
    threshold: dict
    rule: str
    source: str
    normalization: dict
    runs: list = field(default_factory=list)


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


def images_read(reads, pool):
    """The magnifications whose image files a model scores: those of its slots, every one of the run's for 'any'."""
    return tuple(dict.fromkeys(m for r in reads for m in (pool if r == ANY else (r,))))


def settings(ckpt):
    """What the models of an ensemble must share, as trained: slots, the run's magnifications, those read, image size
    and field shape, stain normalisation, test-time augmentation, classes, input normalisation."""
    norm = tuple(tuple(ckpt["normalization"][k]) for k in ("mean", "std"))
    pool = tuple(ckpt["pool"])
    reads = images_read(magnifications_read(ckpt["model_name"], ckpt["model_kwargs"]), pool)
    return (tuple(ckpt["magnifications"]), pool, reads, int(ckpt["image_size"]), tuple(ckpt["field"]),
            bool(ckpt["config"]["stain_norm"]), bool(ckpt["config"]["tta"]), tuple(ckpt["classes"]["subtype"]), norm)


def checkpoint_paths(output_dir, checkpoint="", ensemble=False):
    """The checkpoint(s) a prediction averages: `checkpoint`, the CV fold models (`ensemble`) or best_model.pth."""
    if ensemble and checkpoint:
        raise PipelineError("--ensemble averages the CV fold models; it cannot be combined with --checkpoint. Drop one.")
    if not ensemble:
        path = Path(checkpoint) if checkpoint else Path(output_dir) / "models" / "best_model.pth"
        if not path.is_file():
            raise PipelineError(f"checkpoint {path} not found. Train it (python main.py --stages fixed) or name "
                                f"another with --checkpoint FILE.")
        return [path]
    folder = Path(output_dir) / "models" / "checkpoints"
    paths = sorted(folder.glob(f"{REFERENCE}_fold_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not paths:
        raise PipelineError(f"no CV fold models in {folder} for --ensemble. Train them: python main.py --stages cv")
    return paths


def load_predictor(paths, device):
    """The checkpoints at `paths` (one model, or the CV fold models to average) with what they agree on."""
    ckpts = [checked(p) for p in paths]
    shared = {settings(c) for c in ckpts}
    if len(shared) > 1:
        raise PipelineError(f"the models of {', '.join(map(str, paths))} differ in input slots, image size, "
                            f"stain or input normalisation or classes; an ensemble needs them alike. "
                            f"Retrain them: python main.py --stages cv --force")
    mags, pool, reads, size, field, stain_norm, tta, classes, (mean, std) = shared.pop()
    models = [loaded(p, c, device) for p, c in zip(paths, ckpts)]
    threshold, rule = decision_of(ckpts)
    source = f"ensemble of {len(paths)} CV models" if len(paths) > 1 else str(paths[0])
    return Predictor(models, mags, pool, reads, size, field, stain_norm, tta, list(classes), threshold, rule, source,
                     dict(mean=mean, std=std), [provenance(c["record"]) for c in ckpts])


def provenance(record):
    """Which run a checkpoint comes from: run, split, settings digest, commit, who trained it."""
    return {k: record.get(k) for k in ("run", "split", "digest", "commit", "trained_by", "tuning")}


def decision_of(ckpts):
    """The models' mean patient-level thresholds (`decision`: the one new patients are decided with, under the rule
    each was trained under) and that rule."""
    threshold = {k: float(np.mean([c["threshold"][k] for c in ckpts])) for k in ("decision", "youden", "sens95")}
    rules = sorted({c["threshold_rule"] for c in ckpts})
    return threshold, rules[0] if len(rules) == 1 else "mean of " + "/".join(rules)


def onnx_predictor(path, threads=0):
    """An exported ONNX graph (one model or an ensemble's mean) with the settings its metadata carries."""
    model = OnnxModel(path, threads)
    m = model.meta
    threshold, rule = decision_of([m])
    return Predictor([model], tuple(m["magnifications"]), tuple(m["pool"]), tuple(m["reads"]), int(m["image_size"]),
                     tuple(m["field"]), bool(m["stain_norm"]), bool(m["tta"]), list(m["classes"]["subtype"]),
                     threshold, rule, f"{path} (onnxruntime)", m["normalization"], m["runs"])


def score(p, frame, bank, batch_size, device, dtype=None):
    """Evaluation tuples of every patient (one per distinct image for a model that reads one magnification) with the
    models' outputs averaged: probability (over the four views where the models were trained with --tta), weights,
    subtype probabilities."""
    tuples = eval_tuples(frame, p.mags, p.pool)
    batches = eval_batches(tuples, p.mags, bank.row_of, p.classes, batch_size)
    runs = [predict(model, bank, batches, device, dtype, tta=p.tta) for model in p.models]
    tuples["prob_malignant"] = np.mean([r["prob"] for r in runs], 0)
    for j, m in enumerate(slot_labels(p.mags)):
        tuples[f"w_{m}"] = np.mean([r["mag_weights"][:, j] for r in runs], 0)
    subtype = np.mean([r["subtype_prob"] for r in runs], 0)
    return tuples, subtype


def score_images(p, inputs, batch_size, device, dtype=None):
    """The one path from image files to patient decisions (predict stage and service): list and check the files,
    decode them as in training, score every patient's evaluation tuples, build the patient and image tables."""
    frame, bank, problems, left_out = load_images(inputs, p.reads, p.field, p.stain_norm, p.classes)
    if frame.empty:
        return Scored(frame, bank, None, None, None, problems, left_out)
    tuples, subtype = score(p, frame, bank, batch_size, device, dtype)
    patients = patient_table(tuples, subtype, frame, p)
    return Scored(frame, bank, tuples, patients, image_table(tuples, frame, problems, left_out, p), problems, left_out)


def decision(prob, threshold):
    return np.where(prob >= threshold, "malignant", "benign")


def patient_table(tuples, subtype, frame, p):
    """One row per patient: images per magnification, mean probability, decisions, subtype, magnification weights."""
    at = tuples.groupby("patient_id", sort=True)
    counts = frame.groupby(["patient_id", "magnification"]).size().unstack(fill_value=0)
    table = counts.reindex(index=at.size().index, columns=list(p.reads), fill_value=0).add_prefix("n_")
    table["prob_malignant"] = at["prob_malignant"].mean()
    table["decision"] = decision(table["prob_malignant"], p.threshold["decision"])
    table["decision_high_sensitivity"] = decision(table["prob_malignant"], p.threshold["sens95"])
    table["threshold"], table["threshold_high_sensitivity"] = p.threshold["decision"], p.threshold["sens95"]
    table["threshold_rule"] = p.rule
    sub = pd.DataFrame(subtype, index=tuples["patient_id"]).groupby(level=0).mean().reindex(table.index).to_numpy()
    table["subtype"] = [p.classes[i] for i in sub.argmax(1)] if sub.shape[1] else ""
    table["subtype_prob"] = sub.max(1) if sub.shape[1] else np.nan
    for m in slot_labels(p.mags):
        table[f"weight_{m}"] = at[f"w_{m}"].mean()
    truth = frame.groupby("patient_id").agg(label=("label", "max"), true_subtype=("subtype_group", "first"))
    table["true_class"] = truth["label"].map({0: "benign", 1: "malignant", -1: ""})
    table["true_subtype"] = truth["true_subtype"]
    table["n_tuples"] = at.size()
    return table.reset_index()


def image_table(tuples, frame, problems, left_out, p):
    """Every input file: its patient, magnification, labels, mean probability over the tuples holding it, or why not."""
    used = pd.concat([tuples[[f"path_{m}", "prob_malignant"]].set_axis(["path", "prob"], axis=1)
                      for m in slot_labels(p.mags)])
    prob = used[used["path"] != ""].groupby("path")["prob"].agg(["mean", "size"])
    table = frame[["path", "patient_id", "magnification", "class_name", "subtype", "note"]].copy()
    table["prob_malignant"] = table["path"].map(prob["mean"])
    table["n_tuples"] = table["path"].map(prob["size"]).astype("Int64")
    table.insert(1, "status", "scored")
    others = [dict(path=f, status="not scored", note=why) for f, why in problems]
    others += [dict(path=f, status="left out", note=why) for f, why in left_out]
    return pd.concat([table, pd.DataFrame(others)], ignore_index=True) if others else table




def read_metadata(session):
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in META if k not in props and k != "parity"]
    if missing:
        raise PipelineError(f"the ONNX file lacks {', '.join(missing)} in its metadata: export it with this pipeline "
                            f"(python main.py --stages export).")
    return {k: json.loads(v) for k, v in props.items() if k in META}


def session_of(path, threads=0):
    """An onnxruntime session on the GPU where onnxruntime has one, else on the CPU (`threads` 0: its default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for any unusable file
        raise PipelineError(f"{path} is not a usable ONNX model ({type(e).__name__}: {str(e)[:200]}). Export it "
                            f"again: python main.py --stages export") from None


class OnnxModel:
    """An onnxruntime session with a model's interface: eval(), normalization, and (x, mask) -> the output dict,
    whose logits are those of the graph's probabilities."""

    def __init__(self, path, threads=0):
        self.session = session_of(path, threads)
        self.meta = read_metadata(self.session)
        self.normalization = self.meta["normalization"]
        self.magnifications = tuple(self.meta["magnifications"])
        self.used_mags = list(range(len(self.magnifications)))

    def eval(self):
        return self

    def to(self, device):
        return self

    def __call__(self, x, mask):
        feeds = {"images": x.detach().float().cpu().numpy(), "mask": mask.detach().bool().cpu().numpy()}
        prob, subtype, weights = (torch.from_numpy(v).to(x.device) for v in self.session.run(list(OUTPUTS), feeds))
        return dict(binary_logits=torch.logit(prob.double()).float(), subtype_logits=subtype.log(),
                    mag_weights=weights)
