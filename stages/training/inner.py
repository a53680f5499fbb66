"""Choices from all of a run's training patients: K inner models on grouped, stratified folds of the split's
train+val patients (--inner-folds); their out-of-fold predictions give the decision threshold (--threshold-rule
oof_youden). The split's test patients stay test in every inner split and are never predicted."""
import shutil
import time

import pandas as pd

from backbones import build_model
from preprocess.preprocess import inner_splits, load_split
from stages.training.data import prepare_run
from stages.training.forward import amp_settings, predict
from stages.training.train import fit
from utils.helpers import RunFiles, log, write_csv
from utils.scoring import oof_thresholds


def wanted(cfg, spec):
    """Inner models are trained under --threshold-rule oof_youden; ensemble members need none (the ensemble's
    threshold comes from the members' own held-out parts)."""
    return cfg.threshold_rule == "oof_youden" and not spec.members


def inner_model(cfg, spec, split_name, i, part, device):
    """One inner model's predictions on its held-out patients (tuple rows), kept as oof.csv in its folder."""
    run = prepare_run(cfg, spec.name, f"{split_name}/inner_{i}", spec.model, dict(spec.flags), split=part)
    path = RunFiles(run.folder).oof
    if path.exists() and not cfg.force:
        return pd.read_csv(path, dtype={"patient_id": str})
    model = build_model(spec.model, **run.model_kwargs)
    fit(cfg, model, run, device)
    dtype, _ = amp_settings(cfg, device)
    res = predict(model, run.inputs(model), run.batches["val"], device, dtype)
    frame = run.tuples["val"][["patient_id", "tuple_id", "label"]].assign(prob_malignant=res["prob"])
    write_csv(frame, path, index=False)
    shutil.rmtree(RunFiles(run.folder).checkpoints, ignore_errors=True)
    return frame


def oof_threshold(cfg, spec, split_name, device):
    """({level: Youden threshold} on the inner models' out-of-fold predictions over the split's train+val patients:
    the tuples, and each patient's mean probability; seconds). The inner models never predict a test patient."""
    start = time.time()
    parts = inner_splits(load_split(cfg, split_name), cfg.inner_folds, cfg.seed, "--inner-folds")
    oof = pd.concat([inner_model(cfg, spec, split_name, i, part, device) for i, part in enumerate(parts)],
                    ignore_index=True)
    thresholds = oof_thresholds(oof)
    log(f"[{spec.name}/{split_name}] {len(parts)} inner models, out-of-fold over {oof['patient_id'].nunique()} "
        f"train+val patients: Youden threshold {thresholds['patient']:.3f} on patient means, "
        f"{thresholds['tuple']:.3f} on tuples ({time.time() - start:.0f}s)")
    return thresholds, time.time() - start
