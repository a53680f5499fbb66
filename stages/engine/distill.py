"""Knowledge distillation: the hard-label criterion plus the match to a frozen teacher's softened probabilities."""
import torch
import torch.nn.functional as F

from preprocess.transforms import normalize
from stages.engine.checkpoint import load_model
from utils.helpers import PipelineError
from utils.losses import distillation_loss


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
