"""Model cost: parameters, thop MACs (FLOPs = 2 x MACs) and median latency per forward pass, for one model and for
every run's best checkpoint (the efficiency table)."""
import copy
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch

from stages.training.checkpoint import load_model
from stages.training.runs import REFERENCE
from utils.env import resolve_device
from utils.helpers import RunFiles
from utils.scoring import level_frame
from utils.tables import EFFICIENCY

SUMMED = ("params", "params_m", "macs", "flops", "macs_g", "flops_g", "ms_per_tuple", "ms_per_patient")


def tuples_per_patient(runs):
    """Median number of test tuples per patient over the reference's runs (the unit of 'ms per patient')."""
    frames = [level_frame(r["pred"], "tuple", "test") for r in runs.get(REFERENCE, {}).values()]
    frames = [f for f in frames if len(f)]
    if not frames:
        return 1
    return max(1, int(round(pd.concat(frames).groupby("patient_id").size().median())))


def architecture(ckpt):
    """What a checkpoint's cost depends on: its model, model settings and field, never its weights."""
    kwargs = {k: v for k, v in ckpt["model_kwargs"].items() if k not in ("pretrained", "pretrained_path")}
    return ckpt["model_name"], repr(sorted(kwargs.items())), tuple(ckpt["field"]), tuple(ckpt["magnifications"])


def profile_run(name, checkpoint, device, per_patient, measured=None):
    """One checkpoint's cost; `measured` ({architecture: (stats, patient stats)}) profiles each architecture once,
    so the fold models of a run and runs of the same model share one latency figure."""
    model, ckpt = load_model(checkpoint, device)
    n_mags, size = len(ckpt["magnifications"]), tuple(ckpt["field"])
    measured = {} if measured is None else measured
    key = architecture(ckpt)
    if key not in measured:
        measured[key] = (profile_model(model, n_mags, size, device),
                         profile_model(model, n_mags, size, device, batch=per_patient))
    stats, patient = measured[key]
    return dict(model=name, params=int(stats["params"]), params_m=stats["params"] / 1e6, macs=int(stats["macs"]),
                flops=int(stats["flops"]), macs_g=stats["macs"] / 1e9,
                flops_g=stats["flops"] / 1e9, ms_per_tuple=stats["ms_median"], ms_per_patient=patient["ms_median"],
                tuples_per_patient=per_patient, image_size=ckpt["image_size"], field=f"{size[1]}x{size[0]}",
                device=str(device),
                checkpoint=str(checkpoint))


def profile_members(name, paths, device, per_patient, measured=None):
    """An averaging run (fold ensemble, teacher): its members' costs added up, as they run one after another."""
    rows = [profile_run(name, p, device, per_patient, measured) for p in paths]
    total = {k: sum(r[k] for r in rows) for k in SUMMED}
    return dict(rows[0], **total, checkpoint=" + ".join(map(str, paths)))


def checkpoints_of(splits):
    """(best.pth of the first split that has one, else the members an averaging run lists, else none)."""
    own = next((r["checkpoint"] for r in splits.values() if r["checkpoint"].exists()), None)
    if own is not None:
        return [own]
    members = next((r["metrics"].get("members") for r in splits.values() if r["metrics"].get("members")), [])
    paths = [RunFiles(p).best if Path(p).is_dir() else Path(p) for p in members]
    return paths if all(p.exists() for p in paths) else []


def efficiency_table(cfg, runs, notes):
    """Params, MACs (thop), FLOPs = 2 x MACs and median latency of each run's best checkpoint (or members) here,
    each architecture timed once."""
    device = resolve_device(cfg.device)
    per_patient = tuples_per_patient(runs)
    rows, measured = [], {}
    for name, splits in runs.items():
        paths = checkpoints_of(splits)
        if not paths:
            notes.append(f"efficiency: {name} has no checkpoints/best.pth, skipped.")
            continue
        try:
            rows.append(profile_members(name, paths, device, per_patient, measured))
        except Exception as e:
            notes.append(f"efficiency: {name} could not be profiled from {paths[0]} ({type(e).__name__}: {e}).")
    return pd.DataFrame(rows, columns=EFFICIENCY)


def count_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def count_macs(model, inputs):
    """thop multiply-accumulates on a deep copy, so thop's counter buffers never reach the real model."""
    from thop import profile
    clone = copy.deepcopy(model).eval()
    with torch.no_grad():
        macs, _ = profile(clone, inputs=inputs, verbose=False)
    return int(macs)


def time_forward(model, inputs, device, repeats=20, warmup=3):
    """Median wall time (ms) of a forward pass after warm-up; AMP autocast and synchronize on CUDA."""
    autocast = torch.autocast("cuda") if device.type == "cuda" else nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile_model(model, n_mags, image_size, device="cpu", threads=None, batch=1, repeats=20, warmup=3):
    """Params, trainable params, MACs/FLOPs (thop, one batch) and median latency of one batch of tuples of whole
    fields (`image_size`: a side, or (height, width))."""
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        was_training = model.training
        model.eval().to(device)
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        x = torch.randn(batch, n_mags, 3, height, width, device=device)
        mask = torch.ones(batch, n_mags, dtype=torch.bool, device=device)
        macs = count_macs(model, (x, mask))
        ms = time_forward(model, (x, mask), device, repeats, warmup)
        model.train(was_training)
    finally:
        torch.set_num_threads(old_threads)
    return dict(
        params=count_params(model), trainable_params=count_params(model, trainable=True), macs=macs, flops=2 * macs,
        macs_g=macs / 1e9, flops_g=2 * macs / 1e9, ms_median=ms, batch=batch, image_size=image_size, n_mags=n_mags,
        device=str(device), threads=threads or old_threads if device.type == "cpu" else None,
    )
