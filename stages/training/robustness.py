"""Robustness stage: the trained CV models of MMNet and simple_concat on altered test inputs, no training. Each
magnification in turn is missing for every test patient (its images dropped, so its slot is masked as a real missing
magnification is), blurred, JPEG-compressed or stain-shifted beyond the training jitter; each fold's patient
predictions per condition go to robustness.csv in its run folder, which table 8 reads."""
import math

import kornia
import pandas as pd
import torch
from torchvision.io import decode_jpeg, encode_jpeg

from preprocess.cache import cache_folder
from preprocess.transforms import hed_map, prepare
from preprocess.tuples import ANY, eval_tuples, image_bank, slot_labels
from stages.training.checkpoint import load_model
from stages.training.data import split_frames
from stages.training.evaluate import predict_all
from stages.training.runs import REFERENCE
from utils.env import resolve_device
from utils.helpers import PipelineError, RunFiles, log, read_json, runs_dir, write_csv

RUNS = (REFERENCE, "simple_concat")
KINDS = ("missing", "blur", "jpeg", "stain")
BLUR = 1 / 112  # Gaussian sigma as a share of the field's short side: 2 px at 224, an out-of-focus field
JPEG_QUALITY = 30
STAIN_GAIN = (1.4, 0.6, 1.0)  # haematoxylin, eosin, DAB density gains: past the training jitter's [0.8, 1.2]


def conditions(slots):
    """'clean', then each kind of alteration of each magnification the slots read."""
    mags = [m for m in dict.fromkeys(slots) if m != ANY]
    return ["clean"] + [f"{kind}_{m}" for kind in KINDS for m in mags]


def blur(x):
    sigma = BLUR * min(x.shape[-2:])
    side = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(x, (side, side), (sigma, sigma))


def jpeg(x):
    images = [i for i in (x * 255).round().to(torch.uint8).cpu()]
    decoded = decode_jpeg(encode_jpeg(images, quality=JPEG_QUALITY))
    return torch.stack(decoded).to(x.device).float() / 255


def stain(x):
    gain = x.new_tensor(STAIN_GAIN).expand(x.shape[0], 3)
    return hed_map(x, gain, torch.zeros_like(gain))


ALTER = dict(blur=blur, jpeg=jpeg, stain=stain)


class Altered:
    """An image bank whose fields in `slots` pass through `alter` (float (N, 3, H, W) in [0, 1]) before the model."""

    def __init__(self, bank, slots, alter):
        self.bank, self.slots, self.alter = bank, slots, alter
        self.row_of = bank.row_of

    def batch(self, rows, device, train, normalization):
        images, mask = self.bank.gather(rows, device)
        for j in self.slots:
            x = images[:, j].permute(0, 3, 1, 2).float() / 255
            images[:, j] = (self.alter(x) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return prepare(images, mask, device, train=train, **normalization)


def patient_frame(pred, condition, labels):
    """One row per test patient: label, mean probability over its tuples and mean CMF weight of each slot."""
    weights = {f"w_{m}": (f"w_{m}", "mean") for m in labels}
    out = pred.groupby("patient_id", sort=True).agg(label=("label", "first"), prob_malignant=("prob_malignant", "mean"),
                                                    n_tuples=("tuple_id", "size"), **weights).reset_index()
    kind, _, mag = condition.partition("_")
    out.insert(0, "magnification", mag)
    out.insert(0, "kind", kind)
    out.insert(0, "condition", condition)
    return out


def condition_inputs(condition, test, slots, bank):
    """(test image rows, image source) of one condition."""
    kind, _, mag = condition.partition("_")
    if kind == "missing":
        return test[test["magnification"] != mag], bank
    if kind in ALTER:
        return test, Altered(bank, [j for j, s in enumerate(slots) if s == mag], ALTER[kind])
    return test, bank


def fold_frame(cfg, folder, split, device):
    """Every condition's patient rows of one CV fold's test patients, through the run's kept weights."""
    model, ckpt = load_model(RunFiles(folder).best, device)
    slots, pool, classes = tuple(ckpt["magnifications"]), tuple(ckpt["pool"]), list(ckpt["classes"]["subtype"])
    index, parts = split_frames(cfg, split)
    bank = image_bank(index["path"].astype(str).tolist(), tuple(ckpt["field"]), bool(ckpt["config"]["stain_norm"]),
                      cache_folder(cfg))
    frames = []
    for condition in conditions(slots):
        rows, source = condition_inputs(condition, parts["test"], slots, bank)
        tuples = eval_tuples(rows, slots, pool)
        pred = predict_all(model, tuples, slots, classes, source, device, cfg.batch_size, bool(ckpt["config"]["tta"]))
        frames.append(patient_frame(pred, condition, slot_labels(slots)))
    return pd.concat(frames, ignore_index=True)


def is_current(path, checkpoint, expected):
    """A robustness.csv newer than the weights it scored, holding every expected condition."""
    if not path.exists() or path.stat().st_mtime < checkpoint.stat().st_mtime:
        return False
    return set(pd.read_csv(path, usecols=["condition"])["condition"]) == set(expected)


def fold_folders(cfg, name):
    """Finished CV folds of one run (those --folds names, when given)."""
    wanted = {f"fold_{k}" for k in cfg.folds}
    folders = sorted((runs_dir(cfg) / name).glob("fold_*"))
    return [f for f in folders if (not wanted or f.name in wanted) and RunFiles(f).metrics.exists()
            and RunFiles(f).best.exists()]


def run_robustness(cfg):
    """Stage: patient predictions of every finished CV fold of MMNet and simple_concat (those --runs names) under
    each condition."""
    device = resolve_device(cfg.device)
    names = [name for name in RUNS if not cfg.runs or name in cfg.runs]
    if not names:
        log(f"robustness: --runs names none of {', '.join(RUNS)}; nothing to score")
        return
    found = {name: fold_folders(cfg, name) for name in names}
    if not any(found.values()):
        raise PipelineError(f"no finished CV fold of {' or '.join(names)} under {runs_dir(cfg)}. "
                            "Train first: python main.py --stages cv,baselines")
    for name, folders in found.items():
        for folder in folders:
            files = RunFiles(folder)
            target, checkpoint = files.robustness, files.best
            slots = read_json(files.metrics)["model_kwargs"]["magnifications"]
            if not cfg.force and is_current(target, checkpoint, conditions(slots)):
                log(f"robustness {name}/{folder.name}: up to date ({target})")
                continue
            frame = fold_frame(cfg, folder, folder.name, device)
            write_csv(frame, target, index=False)
            log(f"robustness {name}/{folder.name}: {frame['condition'].nunique()} conditions x "
                f"{frame['patient_id'].nunique()} test patients -> {target}")
