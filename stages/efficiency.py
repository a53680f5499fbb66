"""Efficiency of every run's best checkpoint: params, MACs (thop), FLOPs = 2 x MACs, median latency on this device."""
import pandas as pd

from stages.engine.checkpoint import load_model
from stages.runs import REFERENCE
from utils.efficiency import profile_model
from utils.env import resolve_device
from utils.scoring import level_frame
from utils.tables import EFFICIENCY


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


def efficiency_table(cfg, runs, notes):
    """Params, MACs (thop), FLOPs = 2 x MACs and median latency of each run's best checkpoint on this device."""
    device = resolve_device(cfg.device)
    per_patient = tuples_per_patient(runs)
    rows = []
    for name, splits in runs.items():
        checkpoint = next((r["checkpoint"] for r in splits.values() if r["checkpoint"].exists()), None)
        if checkpoint is None:
            notes.append(f"efficiency: {name} has no checkpoints/best.pth, skipped.")
            continue
        try:
            rows.append(profile_run(name, checkpoint, device, per_patient))
        except Exception as e:
            notes.append(f"efficiency: {name} could not be profiled from {checkpoint} ({type(e).__name__}: {e}).")
    return pd.DataFrame(rows, columns=EFFICIENCY)
