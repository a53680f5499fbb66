"""Checkpoints: what inference needs (weights, model settings, classes, input slots, field shape, normalisation),
resume state, and about how much disk a run's files take."""
import io
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from backbones import build_model
from utils.helpers import PipelineError, RunFiles, write_bytes

CHECKED_KWARGS = ("backbone", "magnifications", "num_subtypes", "shared_backbone", "use_spatial", "use_channel",
                  "use_hma", "use_cmf", "feature_stage")
ROW_BYTES = 1000


def checkpoint(model, meta, cfg, epoch, best_auc):
    """What inference needs: weights, how to rebuild the model, classes, its input slots (`magnifications`) and the
    run's magnifications an 'any' slot draws from (`pool`), the short side and the whole-field shape its inputs had,
    normalisation."""
    return dict(
        model=model.state_dict(), model_name=meta.model_name, model_kwargs=dict(meta.model_kwargs),
        config=asdict(cfg), classes={"binary": ["benign", "malignant"], "subtype": list(meta.classes)},
        magnifications=list(model.magnifications), pool=list(cfg.magnifications), image_size=cfg.image_size,
        field=list(meta.bank.shape), normalization=dict(model.normalization), epoch=epoch, best_auc=best_auc,
    )


def describe(ckpt):
    kwargs = ckpt.get("model_kwargs", {})
    info = {k: kwargs.get(k) for k in CHECKED_KWARGS if k in kwargs}
    info.update(model_name=ckpt.get("model_name"), image_size=ckpt.get("image_size"), field=ckpt.get("field"),
                subtype_classes=list(ckpt.get("classes", {}).get("subtype", [])))
    for key in ("magnifications", "feature_stage"):
        if info.get(key) is not None:
            info[key] = list(info[key])
    return info


def check_checkpoint(ckpt, expected, path=""):
    """Raise a PipelineError naming every field where checkpoint and current configuration differ."""
    have, want = describe(ckpt), describe(expected)
    diffs = [f"{k}: {have.get(k)!r} in the checkpoint vs {want.get(k)!r} now"
             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if not diffs:
        return
    raise PipelineError(f"checkpoint {path} does not match the current configuration ({'; '.join(diffs)}). "
                        f"Use the settings it was trained with, or retrain with --force.")


def load_state(model, ckpt, path=""):
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PipelineError(f"checkpoint {path} does not fit model '{ckpt.get('model_name')}' as configured now "
                            f"(state_dict mismatch: {first[:300]}).") from None


def read_checkpoint(path, device="cpu"):
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"checkpoint {path} not found. Train it first (stages cv / fixed / baselines / ablations).")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise PipelineError(f"checkpoint {path} is damaged or incomplete ({type(e).__name__}: {str(e)[:200]}). Delete it "
                            f"to train that run again from scratch, or rerun its stage with --force.") from None


def load_model(path, device="cpu", expect=None):
    """(model in eval mode, checkpoint dict) rebuilt through backbones.build_model; `expect` checks the settings."""
    ckpt = read_checkpoint(path, device)
    if expect is not None:
        check_checkpoint(ckpt, expect, path)
    kwargs = dict(ckpt["model_kwargs"], pretrained=False)
    if "pretrained_path" in kwargs:
        kwargs["pretrained_path"] = ""
    model = build_model(ckpt["model_name"], **kwargs)
    load_state(model, ckpt, path)
    return model.to(device).eval(), ckpt


def save(obj, path):
    """torch.save through an atomic write: a kill or a full disk never leaves a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def run_bytes(model, rows=0):
    """About the most disk one run takes: best.pth (the weights), last.pth (weights and optimiser state, about 3x),
    a new last.pth beside the old one while it is replaced, and about 1 kB per predictions.csv row."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return weights * (1 + 3 + 3) + rows * ROW_BYTES


def finish_bytes(folder, rows):
    """About the disk a fitted run's last writes take: best.pth and last.pth rewritten beside the old ones, and the
    predictions."""
    files = RunFiles(folder)
    return sum(f.stat().st_size for f in (files.best, files.last) if f.exists()) + rows * ROW_BYTES


def slim_last(folder):
    """A finished run's last.pth drops the optimiser state (only --resume needs it), or links best.pth if equal."""
    files = RunFiles(folder)
    last, best = files.last, files.best
    if not last.exists():
        return
    ckpt = read_checkpoint(last)
    if best.exists() and ckpt.get("state", {}).get("best_epoch") == ckpt["epoch"] and link(best, last):
        return
    for key in ("optimizer", "scheduler", "scaler", "rng", "average"):
        ckpt.pop(key, None)
    save(ckpt, last)


def link(source, target):
    """Replace target by a hard link to source; False where the file system has no hard links."""
    tmp = target.with_suffix(".link")
    try:
        os.link(source, tmp)
    except OSError:
        return False
    tmp.replace(target)
    return True


def rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
