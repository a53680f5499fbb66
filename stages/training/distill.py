"""Distill stage: a smaller MMNet trained on the fixed split's training patients to match a teacher that never saw a
fixed test patient, plus the hard labels; the teacher is scored beside it on the same test patients."""
from functools import partial

import torch
import torch.nn.functional as F

from backbones.common import normalization
from preprocess.preprocess import load_split
from preprocess.transforms import normalize
from stages.training import ensemble
from stages.training.checkpoint import load_model, read_checkpoint
from stages.training.record import derived_record, read_record, write_record
from stages.training.run import run_one
from stages.training.runs import REFERENCE, STUDENT, TEACHER, stage_runs
from utils.helpers import PipelineError, RunFiles, log, read_json, require, run_dir, split_path, write_bytes, write_json
from utils.losses import distillation_loss
from utils.scoring import check_no_leak


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


def teacher_run(cfg):
    """(the teacher's run folder, its checkpoints), chosen here alone: table 2's ensemble where its members are
    trained (none saw a fixed test patient), else the fixed-split reference model (fixed train, fixed val)."""
    members = ensemble.honest_members(cfg)
    if members:
        ensemble.member_ensemble(cfg)
        return run_dir(cfg, ensemble.ENSEMBLE, "fixed"), members
    folder = run_dir(cfg, REFERENCE, "fixed")
    path = RunFiles(folder).best
    if not path.exists() or read_record(folder) is None:
        raise PipelineError(f"the distill stage needs a teacher, {path} is missing. Train it first: "
                            f"python main.py --stages split,fixed")
    return folder, [path]


def check_teacher(cfg, record, paths):
    """Stop when anything behind the teacher trained or validated on a fixed test patient (the CV fold models did),
    or when the teacher reads images of another size than --image-size."""
    split = load_split(cfg, "fixed")
    check_no_leak(record["sources"], split.loc[split["role"] == "test", "patient_id"], f"teacher {record['run']}")
    sizes = {int(read_checkpoint(p)["image_size"]) for p in paths}
    if sizes != {cfg.image_size}:
        raise PipelineError(f"the teacher reads {'/'.join(map(str, sorted(sizes)))} px images; run the distill stage "
                            f"with --image-size {min(sizes)} (the student's own size is --student-image-size).")


def write_teacher(cfg, folder, record):
    """The teacher's row of table 4, beside the student: its run's predictions and metrics as run <student>_teacher,
    its record naming that run."""
    target, source = run_dir(cfg, TEACHER, "fixed"), RunFiles(folder)
    metrics = dict(read_json(source.metrics), run=TEACHER, teacher_of=STUDENT)
    write_bytes(RunFiles(target).predictions, source.predictions.read_bytes())
    write_json(RunFiles(target).metrics, metrics)
    write_record(target, derived_record(TEACHER, "fixed", [record], f"the teacher: {record['run']}/fixed"))
    return metrics


def teach(cfg, paths, run, device):
    """Swap the run's criterion for distillation from the teacher; the fields the student's metrics.json adds."""
    teachers = load_teachers(paths, run.classes, cfg.magnifications, device)
    run.criterion = Distillation(run.criterion, teachers, normalization(run.model_kwargs["backbone"]),
                                 cfg.distill_temperature, cfg.distill_weight, cfg.subtype_loss_weight)
    return dict(teacher=dict(run=TEACHER, members=[str(p) for p in paths], image_sizes=[s for _, s in teachers],
                             temperature=cfg.distill_temperature, weight=cfg.distill_weight))


def patient_auc(metrics):
    return metrics["test"]["patient"]["t0.5"]["auc"]


def run_distill(cfg):
    """Stage: the teacher's scores on the fixed split, then the student distilled from it."""
    require(split_path(cfg, "fixed"), "split")
    folder, paths = teacher_run(cfg)
    record = read_record(folder)
    check_teacher(cfg, record, paths)
    specs = {s.name: s for s in stage_runs(cfg, "distill")}
    teacher = write_teacher(cfg, folder, record) if TEACHER in specs else None
    if STUDENT not in specs:
        return
    spec = specs[STUDENT]
    sources = [dict(s, name=f"the teacher's {s['name']}") for s in record["sources"]]
    student = run_one(cfg, spec, "fixed", adapt=partial(teach, cfg, paths), sources=sources)
    vs = f" vs teacher {patient_auc(teacher):.3f}" if teacher else ""
    log(f"[{STUDENT}] {cfg.student_backbone} at {cfg.student_image_size} px, embedding {cfg.student_embed_dim}, "
        f"T={cfg.distill_temperature}, weight {cfg.distill_weight}: fixed test patient AUC "
        f"{patient_auc(student):.3f}{vs}")
