"""Grad-CAM and spatial-attention maps per magnification for the multi-input models, with plain forward hooks."""
from contextlib import contextmanager

import torch
import torch.nn.functional as F


@contextmanager
def captured(layers):
    """Record the outputs of `layers` during a forward pass; the hooks are removed on exit, errors included."""
    outputs = []
    handles = [layer.register_forward_hook(lambda module, args, output: outputs.append(output)) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def per_magnification(outputs, batch, n_used):
    """Hook outputs -> list of n_used tensors (B, C, h, w) in the order of model.used_mags."""
    if len(outputs) == 1 and outputs[0].shape[0] == batch * n_used:
        return list(outputs[0].unflatten(0, (batch, n_used)).unbind(1))
    if len(outputs) == n_used and all(o.shape[0] == batch for o in outputs):
        return outputs
    shapes = [tuple(o.shape) for o in outputs]
    raise RuntimeError(f"cam_layers() gave outputs {shapes}; expected one (B*m, C, h, w) or m of (B, C, h, w), m={n_used}")


def normalise(maps):
    """Min-max scale each (h, w) map to [0, 1]; constant maps become 0."""
    flat = maps.flatten(-2)
    low = flat.min(-1, keepdim=True).values
    span = flat.max(-1, keepdim=True).values - low
    scaled = torch.where(span > 1e-12, (flat - low) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.view_as(maps)


def target_scores(out, target, class_idx):
    """Per-sample score to explain: the binary logit signed toward the class, or a subtype logit."""
    if target == "binary":
        logit = out["binary_logits"].float()
        cls = (logit > 0).long() if class_idx is None else torch.as_tensor(class_idx, device=logit.device).expand_as(logit)
        return torch.where(cls == 1, logit, -logit)
    logits = out["subtype_logits"].float()
    cls = logits.argmax(1) if class_idx is None else torch.as_tensor(class_idx, device=logits.device).expand(len(logits))
    return logits.gather(1, cls.view(-1, 1)).squeeze(1)


def cam_from(activation, gradient):
    weights = gradient.mean((2, 3), keepdim=True)
    return F.relu((weights * activation).sum(1))


def gradcam(model, x, mask=None, target="binary", class_idx=None):
    """Grad-CAM maps (B, M, H, W) in [0, 1] on model.cam_layers(); zeros for absent or unused magnifications.

    target 'binary' explains the predicted class (class_idx 1 = malignant, 0 = benign), 'subtype' a subtype logit.
    """
    b, n_mags, _, height, width = x.shape
    used = list(model.used_mags)
    was_training = model.training
    model.eval()
    x = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad(), captured(model.cam_layers()) as outputs:
            out = model(x, mask)
            grads = torch.autograd.grad(target_scores(out, target, class_idx).sum(), outputs, allow_unused=True)
    finally:
        model.train(was_training)
    grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
    acts = per_magnification([o.detach() for o in outputs], b, len(used))
    grads = per_magnification(grads, b, len(used))
    maps = torch.zeros(b, n_mags, height, width, device=x.device)
    for j, act, grad in zip(used, acts, grads):
        cam = cam_from(act.float(), grad.float()).unsqueeze(1)
        maps[:, j] = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    if mask is not None:
        maps = maps * mask.to(maps.device, torch.bool).unsqueeze(-1).unsqueeze(-1)
    return normalise(maps).detach()


@torch.no_grad()
def attention_maps(model, x, mask=None):
    """The model's spatial attention maps upsampled to (B, M, H, W) in [0, 1], or None when it has none; plus outputs."""
    was_training = model.training
    model.eval()
    try:
        out = model(x, mask)
    finally:
        model.train(was_training)
    spatial = out.get("spatial_maps")
    if spatial is None:
        return None, out
    maps = F.interpolate(spatial.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return normalise(maps), out
