"""Efficiency of every run's best checkpoint: params, MACs (thop), FLOPs = 2 x MACs, median latency on this device."""
from pathlib import Path

import pandas as pd

from stages.engine.checkpoint import load_model
from stages.runs import REFERENCE
from utils.efficiency import profile_model
from utils.env import resolve_device
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


def profile_run(name, checkpoint, device, per_patient):
    model, ckpt = load_model(checkpoint, device)
    n_mags, size = len(ckpt["magnifications"]), ckpt["image_size"]
    stats = profile_model(model, n_mags, size, device)
    patient = profile_model(model, n_mags, size, device, batch=per_patient)
    return dict(model=name, params=int(stats["params"]), params_m=stats["params"] / 1e6, macs=int(stats["macs"]),
                flops=int(stats["flops"]), macs_g=stats["macs"] / 1e9,
                flops_g=stats["flops"] / 1e9, ms_per_tuple=stats["ms_median"], ms_per_patient=patient["ms_median"],
                tuples_per_patient=per_patient, image_size=ckpt["image_size"], device=str(device),
                checkpoint=str(checkpoint))


def profile_members(name, paths, device, per_patient):
    """An averaging run (fold ensemble, teacher): its members' costs added up, as they run one after another."""
    rows = [profile_run(name, p, device, per_patient) for p in paths]
    total = {k: sum(r[k] for r in rows) for k in SUMMED}
    return dict(rows[0], **total, checkpoint=" + ".join(map(str, paths)))


def checkpoints_of(splits):
    """(best.pth of the first split that has one, else the members an averaging run lists, else none)."""
    own = next((r["checkpoint"] for r in splits.values() if r["checkpoint"].exists()), None)
    if own is not None:
        return [own]
    members = next((r["metrics"].get("members") for r in splits.values() if r["metrics"].get("members")), [])
    paths = [Path(p) / "checkpoints" / "best.pth" if Path(p).is_dir() else Path(p) for p in members]
    return paths if all(p.exists() for p in paths) else []


def efficiency_table(cfg, runs, notes):
    """Params, MACs (thop), FLOPs = 2 x MACs and median latency of each run's best checkpoint (or members) here."""
    device = resolve_device(cfg.device)
    per_patient = tuples_per_patient(runs)
    rows = []
    for name, splits in runs.items():
        paths = checkpoints_of(splits)
        if not paths:
            notes.append(f"efficiency: {name} has no checkpoints/best.pth, skipped.")
            continue
        try:
            rows.append(profile_members(name, paths, device, per_patient))
        except Exception as e:
            notes.append(f"efficiency: {name} could not be profiled from {paths[0]} ({type(e).__name__}: {e}).")
    return pd.DataFrame(rows, columns=EFFICIENCY)
