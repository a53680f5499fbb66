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
from utils.helpers import log, write_csv
from utils.metrics import youden_threshold
from utils.scoring import check_no_leak, seen_patients, union_seen


def wanted(cfg, spec):
    """Inner models are trained under --threshold-rule oof_youden; ensemble members need none (the ensemble's
    threshold comes from the members' own held-out parts)."""
    return cfg.threshold_rule == "oof_youden" and not spec.members


def inner_model(cfg, spec, split_name, i, part, device):
    """One inner model's predictions on its held-out patients (tuple rows), kept as oof.csv in its folder."""
    run = prepare_run(cfg, spec.name, f"{split_name}/inner_{i}", spec.model, dict(spec.flags), split=part)
    path = run.folder / "oof.csv"
    if path.exists() and not cfg.force:
        return pd.read_csv(path, dtype={"patient_id": str}), seen_patients(run.tuples)
    model = build_model(spec.model, **run.model_kwargs)
    fit(cfg, model, run, device)
    dtype, _ = amp_settings(cfg, device)
    res = predict(model, run.inputs(model), run.batches["val"], device, dtype)
    frame = run.tuples["val"][["patient_id", "tuple_id", "label"]].assign(prob_malignant=res["prob"])
    write_csv(frame, path, index=False)
    shutil.rmtree(run.folder / "checkpoints", ignore_errors=True)
    return frame, seen_patients(run.tuples)


def oof_threshold(cfg, spec, split_name, device):
    """(Youden threshold on the inner models' out-of-fold tuple predictions over the split's train+val patients,
    the patients those models saw)."""
    start = time.time()
    split = load_split(cfg, split_name)
    parts = inner_splits(split, cfg.inner_folds, cfg.seed, "--inner-folds")
    results = [inner_model(cfg, spec, split_name, i, part, device) for i, part in enumerate(parts)]
    oof = pd.concat([frame for frame, _ in results], ignore_index=True)
    seen = union_seen([s for _, s in results])
    check_no_leak(seen, split.loc[split["role"] == "test", "patient_id"], f"{spec.name}/{split_name} inner models")
    threshold = youden_threshold(oof["label"].to_numpy(), oof["prob_malignant"].to_numpy())
    log(f"[{spec.name}/{split_name}] {len(parts)} inner models, out-of-fold over {oof['patient_id'].nunique()} "
        f"train+val patients: Youden threshold {threshold:.3f} ({time.time() - start:.0f}s)")
    return threshold, seen, time.time() - start
