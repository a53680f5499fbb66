"""Batch augmentation on the device: flips, 90-degree rotations, small affine and stain-like colour jitter."""
import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

MEAN = tuple(IMAGENET_DEFAULT_MEAN)
STD = tuple(IMAGENET_DEFAULT_STD)


def to_float(images, device):
    """uint8 (B, M, S, S, 3) -> float (B, M, 3, S, S) in [0, 1] on `device`."""
    x = images.to(device, non_blocking=True).permute(0, 1, 4, 2, 3)
    return x.float().div_(255)


def normalize(x):
    mean = x.new_tensor(MEAN).view(1, 1, 3, 1, 1)
    std = x.new_tensor(STD).view(1, 1, 3, 1, 1)
    return (x - mean) / std


def uniform(n, lo, hi, device):
    return torch.empty(n, device=device).uniform_(lo, hi)


def affine(x, max_deg=10.0, max_scale=0.1, max_shift=0.05, p_small=0.5):
    """Random flips and 90-degree turns plus, with probability p_small, a small rotation/scale/shift; one resample."""
    n, device = x.shape[0], x.device
    quarter = torch.randint(0, 4, (n,), device=device).float() * (math.pi / 2)
    small = (torch.rand(n, device=device) < p_small).float()
    angle = quarter + small * uniform(n, -max_deg, max_deg, device) * math.pi / 180
    scale = 1 + small * uniform(n, -max_scale, max_scale, device)
    flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
    shift = small[:, None] * uniform(2 * n, -max_shift, max_shift, device).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0]], 1),
        torch.stack([sin * flip, cos, shift[:, 1]], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def luminance(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def colour_jitter(x, brightness=0.1, contrast=0.1, saturation=0.1, stain=0.05):
    """Brightness, contrast, saturation and a per-channel gain that mimics stain intensity variation."""
    n, device = x.shape[0], x.device
    x = x * uniform(n, 1 - brightness, 1 + brightness, device).view(n, 1, 1, 1)
    mean = luminance(x).mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * uniform(n, 1 - contrast, 1 + contrast, device).view(n, 1, 1, 1) + mean
    gray = luminance(x)
    x = (x - gray) * uniform(n, 1 - saturation, 1 + saturation, device).view(n, 1, 1, 1) + gray
    x = x * uniform(3 * n, 1 - stain, 1 + stain, device).view(n, 3, 1, 1)
    return x.clamp_(0, 1)


def augment(x):
    """Independent random augmentation of every image in a (B, M, 3, S, S) batch in [0, 1]."""
    b, m = x.shape[:2]
    flat = x.reshape(b * m, *x.shape[2:])
    flat = colour_jitter(affine(flat))
    return flat.view_as(x)


def prepare(images, mask, device, train=False):
    """Cached uint8 tuples -> normalised float batch on the device; absent magnifications are zero."""
    x = to_float(images, device)
    if train:
        x = augment(x)
    x = normalize(x)
    mask = mask.to(device, non_blocking=True)
    return x * mask.view(*mask.shape, 1, 1, 1).to(x.dtype), mask


def tta_views(x):
    """Identity, horizontal flip, vertical flip and a 90-degree turn of a (B, M, 3, S, S) batch."""
    return [x, x.flip(-1), x.flip(-2), x.rot90(1, dims=(-2, -1))]
