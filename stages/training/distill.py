"""Distill stage: a smaller MMNet trained on the fixed split's training patients to match a teacher that never saw a
fixed test patient, plus the hard labels; the teacher is scored beside it on the same test patients."""
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from backbones.common import normalization
from preprocess.preprocess import load_split
from preprocess.transforms import normalize
from stages.training import ensemble
from stages.training.checkpoint import load_model, read_checkpoint
from stages.training.ensemble import score_checkpoints
from stages.training.run import run_one
from stages.training.runs import REFERENCE, STUDENT, TEACHER, stage_runs
from utils.helpers import PipelineError, log, read_json_or_none, require, run_dir, split_path
from utils.losses import distillation_loss

ROLES = ("train", "val")


def load_teachers(paths, classes, magnifications, device):
    """The teacher checkpoints as eval-mode models, once they read the student's magnifications and subtype classes."""
    teachers = []
    for path in paths:
        model, ckpt = load_model(path, device)
        if list(ckpt["classes"]["subtype"]) != list(classes) or tuple(ckpt["magnifications"]) != tuple(magnifications):
            raise PipelineError(f"teacher {path} has subtype classes {ckpt['classes']['subtype']} and magnifications "
                                f"{ckpt['magnifications']}; the student has {list(classes)} and {list(magnifications)}. "
                                f"Retrain the teacher on this index (python main.py --stages fixed --force).")
        for p in model.parameters():
            p.requires_grad_(False)
        teachers.append((model, int(ckpt["image_size"])))
    return teachers


class Distillation:
    """(1 - weight) x the run's own loss + weight x KL to the teachers' mean probabilities at `temperature`; the
    teachers see the student's (augmented) images, resized to their own size and normalised their way."""

    def __init__(self, hard, teachers, student_normalization, temperature, weight, subtype_weight):
        self.hard, self.teachers, self.norm = hard, teachers, student_normalization
        self.temperature, self.weight, self.subtype_weight = temperature, weight, subtype_weight

    def __call__(self, out, labels, subtypes, x=None, mask=None):
        hard = self.hard(out, labels, subtypes)
        if x is None or not self.weight:
            return hard
        prob, subtype = self.teacher_probs(x, mask)
        soft = distillation_loss(out, prob, subtype, self.temperature, self.subtype_weight)
        return (1 - self.weight) * hard + self.weight * soft

    @torch.no_grad()
    def teacher_probs(self, x, mask):
        """Mean over the teachers of sigmoid(logit / T) and softmax(subtype logits / T)."""
        mean, std = (x.new_tensor(self.norm[k]).view(1, 1, 3, 1, 1) for k in ("mean", "std"))
        images = x * std + mean
        probs, subtypes = [], []
        for model, size in self.teachers:
            view = images if size == images.shape[-1] else resized(images, size)
            view = normalize(view, model.normalization["mean"], model.normalization["std"])
            out = model(view * mask.view(*mask.shape, 1, 1, 1).to(view.dtype), mask)
            probs.append(torch.sigmoid(out["binary_logits"].float() / self.temperature))
            subtypes.append(torch.softmax(out["subtype_logits"].float() / self.temperature, 1))
        return torch.stack(probs).mean(0), torch.stack(subtypes).mean(0)


def resized(images, size):
    """(B, M, 3, S, S) images bilinearly resized to (size, size)."""
    flat = F.interpolate(images.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False)
    return flat.unflatten(0, images.shape[:2])


def teacher_members(cfg):
    """The teacher's checkpoints, chosen here alone: the honest ensemble (models of grouped folds of the fixed split's
    train + val patients) where it is trained, else the fixed-split reference model (fixed train, fixed val)."""
    members = ensemble.honest_members(cfg)
    if members:
        return [Path(p) for p in members]
    path = run_dir(cfg, REFERENCE, "fixed") / "checkpoints" / "best.pth"
    if not path.exists():
        raise PipelineError(f"the distill stage needs a teacher, {path} is missing. Train it first: "
                            f"python main.py --stages split,fixed")
    return [path]


def seen_of(cfg, path):
    """Patients one member trained or validated on: its run's seen_patients, else the train/val roles of its split."""
    folder = Path(path).parent.parent
    metrics = read_json_or_none(folder / "metrics.json") or {}
    if "seen_patients" in metrics:
        return metrics["seen_patients"]
    split = load_split(cfg, metrics.get("split") or folder.name)
    return {role: split.loc[split["role"] == role, "patient_id"].astype(str).tolist() for role in ROLES}


def union(*seen):
    return {role: sorted({str(p) for s in seen for p in s.get(role, [])}) for role in ROLES}


def check_teacher(cfg, seen, paths):
    """Stop when a teacher member trained or validated on a fixed test patient (the CV fold models did)."""
    split = load_split(cfg, "fixed")
    test = set(split.loc[split["role"] == "test", "patient_id"].astype(str))
    overlap = sorted(test & set(seen["train"] + seen["val"]))
    if overlap:
        raise PipelineError(f"the teacher ({', '.join(map(str, paths))}) trained or validated on fixed test patients "
                            f"{', '.join(overlap[:10])}{' ...' if len(overlap) > 10 else ''}; a student of it would "
                            f"score them unfairly. Use models trained on the fixed split's train + val patients only.")
    sizes = {int(read_checkpoint(p)["image_size"]) for p in paths}
    if sizes != {cfg.image_size}:
        raise PipelineError(f"the teacher reads {'/'.join(map(str, sorted(sizes)))} px images; run the distill stage "
                            f"with --image-size {min(sizes)} (the student's own size is --student-image-size).")


def student_config(cfg):
    """The student's settings: its own image size; it trains on images throughout (the teacher reads images)."""
    return replace(cfg, image_size=cfg.student_image_size, freeze_backbone=False, frozen_epochs=0)


def teach(cfg, paths, teacher_seen, run, device):
    """Swap the run's criterion for distillation from the teacher; the fields the student's metrics.json adds."""
    teachers = load_teachers(paths, run.classes, cfg.magnifications, device)
    run.criterion = Distillation(run.criterion, teachers, normalization(run.model_kwargs["backbone"]),
                                 cfg.distill_temperature, cfg.distill_weight, cfg.subtype_loss_weight)
    own = {role: run.tuples[role]["patient_id"].astype(str).unique().tolist() for role in ROLES}
    return dict(seen_patients=union(own, teacher_seen),
                teacher=dict(run=TEACHER, members=[str(p) for p in paths], image_sizes=[s for _, s in teachers],
                             temperature=cfg.distill_temperature, weight=cfg.distill_weight))


def patient_auc(metrics):
    return metrics["test"]["patient"]["youden"]["auc"]


def run_distill(cfg):
    """Stage: the teacher's scores on the fixed split, then the student distilled from it."""
    require(split_path(cfg, "fixed"), "split")
    paths = teacher_members(cfg)
    seen = union(*[seen_of(cfg, p) for p in paths])
    check_teacher(cfg, seen, paths)
    specs = {s.name: s for s in stage_runs(cfg, "distill")}
    teacher = None
    if TEACHER in specs:
        teacher = score_checkpoints(cfg, TEACHER, paths, f"teacher ({len(paths)} model(s))", dict(seen_patients=seen))
    if STUDENT not in specs:
        return
    student_cfg = student_config(cfg)
    student = run_one(student_cfg, specs[STUDENT], "fixed", adapt=partial(teach, student_cfg, paths, seen))
    vs = f" vs teacher {patient_auc(teacher):.3f}" if teacher else ""
    log(f"[{STUDENT}] {student_cfg.student_backbone} at {student_cfg.image_size} px, embedding "
        f"{student_cfg.student_embed_dim}, T={cfg.distill_temperature}, weight {cfg.distill_weight}: fixed test "
        f"patient AUC {patient_auc(student):.3f}{vs}")
