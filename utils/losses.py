"""Class-weighted (focal) binary cross entropy with label smoothing for the binary head and class-balanced cross
entropy for the subtype head."""
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def focal_alpha(labels):
    """Weight of the positive (malignant) class: the benign fraction, so the minority class weighs more."""
    labels = np.asarray(labels)
    if len(labels) == 0 or labels.min() == labels.max():
        return 0.5
    return float(np.mean(labels == 0))


def class_balanced_weights(counts, beta=0.999):
    """Effective-number weights (1 - beta) / (1 - beta^n) (Cui et al. 2019), mean 1 over present classes, 0 if absent."""
    counts = np.asarray(counts, dtype=float)
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = (1 - beta) / (1 - beta ** counts[present])
    weights[present] *= present.sum() / weights[present].sum()
    return torch.tensor(weights, dtype=torch.float32)


def smoothed(labels, smoothing):
    """Binary targets pulled towards 1/2 by `smoothing` (Szegedy et al. 2016): 1 -> 1 - s/2, 0 -> s/2."""
    return labels.float() * (1 - smoothing) + smoothing / 2


def focal_loss(logits, labels, alpha, gamma, smoothing=0.0):
    """torchvision's sigmoid focal loss (gamma 0: alpha-weighted cross entropy) on smoothed targets; the class weight
    follows the hard label."""
    targets = smoothed(labels, smoothing)
    loss = sigmoid_focal_loss(logits.float(), targets, alpha=-1, gamma=gamma, reduction="none")
    weight = labels.float() * alpha + (1 - labels.float()) * (1 - alpha)
    return (weight * loss).mean()


def subtype_loss(logits, labels, weights):
    """Weighted mean cross entropy; 0 (not NaN) for a batch whose classes all have weight 0 or are ignored (-100)."""
    weights = weights.to(logits.device)
    per = F.cross_entropy(logits.float(), labels, weight=weights, reduction="none")
    total = weights[labels.clamp_min(0)][labels >= 0].sum()
    return per.sum() / total.clamp_min(1e-8)


def binary_kl(logits, target):
    """KL divergence from the target probability to sigmoid(logits), mean over the batch."""
    entropy = F.binary_cross_entropy(target, target, reduction="mean")
    return F.binary_cross_entropy_with_logits(logits, target, reduction="mean") - entropy


def distillation_loss(out, teacher_prob, teacher_subtype, temperature, subtype_weight=0.5):
    """Knowledge distillation (Hinton et al. 2015): KL from the teacher's temperature-softened probabilities to the
    student's, both heads, times T^2 so gradients keep their scale."""
    t = temperature
    loss = binary_kl(out["binary_logits"].float() / t, teacher_prob.float())
    sub = out.get("subtype_logits")
    if subtype_weight and sub is not None and teacher_subtype is not None:
        log_student = F.log_softmax(sub.float() / t, 1)
        loss = loss + subtype_weight * F.kl_div(log_student, teacher_subtype.float(), reduction="batchmean")
    return loss * t * t


class Criterion:
    """Class-weighted (focal) loss with label smoothing on the binary logit plus `subtype_weight` times class-balanced
    CE on the subtype logits."""

    def __init__(self, alpha, subtype_weights, gamma=0.0, subtype_weight=0.5, smoothing=0.0):
        self.alpha, self.gamma, self.smoothing = alpha, gamma, smoothing
        self.subtype_weights, self.subtype_weight = subtype_weights, subtype_weight

    def __call__(self, out, labels, subtypes, x=None, mask=None):
        loss = focal_loss(out["binary_logits"], labels, self.alpha, self.gamma, self.smoothing)
        if self.subtype_weight and out.get("subtype_logits") is not None:
            loss = loss + self.subtype_weight * subtype_loss(out["subtype_logits"], subtypes, self.subtype_weights)
        return loss
