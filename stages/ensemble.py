"""The fold ensemble: the reference model's CV fold models, their probabilities averaged on the fixed split's
validation and test patients, scored like a run (table 2's ensemble row; --ensemble in predict uses the same models)."""
import time
from dataclasses import replace

import numpy as np

from stages.engine.checkpoint import load_model
from stages.engine.data import prepare_run
from stages.engine.evaluate import score
from stages.engine.predict import amp_settings, predict
from stages.engine.train import TrainState
from stages.runs import REFERENCE
from utils.env import resolve_device
from utils.helpers import log, read_json_or_none, run_dir, write_csv, write_json

ENSEMBLE = f"{REFERENCE}_fold_ensemble"
AVERAGED = ("prob", "subtype_prob", "embedding", "mag_weights", "hma_weights")


def fold_models(cfg, folds):
    """best.pth of every CV fold of the reference, or None when one is missing."""
    paths = [run_dir(cfg, REFERENCE, f) / "checkpoints" / "best.pth" for f in folds]
    return paths if paths and all(p.exists() for p in paths) else None


def averaged(outputs):
    return {k: np.mean([o[k] for o in outputs], 0) for k in AVERAGED} | {"loss": float("nan")}


def fold_ensemble(cfg, folds):
    """Score the CV fold models' mean probability on the fixed split; skipped (with a line) without every fold."""
    paths = fold_models(cfg, folds)
    if paths is None:
        log(f"[{ENSEMBLE}] needs every CV fold model of {REFERENCE} ({', '.join(folds)}); run the 'cv' stage first")
        return
    score_members(cfg, ENSEMBLE, paths, f"{len(paths)} fold models")


def score_members(cfg, name, paths, what, extra=None):
    """The checkpoints' mean probability on the fixed split's validation and test patients, written and scored as run
    `name` (skipped when finished with the same members); returns its metrics."""
    folder = run_dir(cfg, name, "fixed")
    done = read_json_or_none(folder / "metrics.json")
    if done is not None and not cfg.force and done.get("members") == [str(p) for p in paths]:
        log(f"[{name}/fixed] finished earlier with the same members; skipped (--force reruns it)")
        return done
    start, device = time.time(), resolve_device(cfg.device)
    run = prepare_run(cfg, name, "fixed", REFERENCE, {})
    dtype, _ = amp_settings(cfg, device)
    outputs = {"val": [], "test": []}
    for path in paths:
        model, _ = load_model(path, device)
        for role in outputs:
            outputs[role].append(predict(model, run.bank, run.batches[role], device, dtype))
    res = {role: averaged(o) for role, o in outputs.items()}
    predictions, metrics = score(replace(cfg, smote=False, tta=False), run, res, device, TrainState(), start)
    metrics.update(extra or {}, members=[str(p) for p in paths])
    write_csv(predictions, folder / "predictions.csv", index=False)
    write_json(folder / "metrics.json", metrics)
    p = metrics["test"]["patient"]["youden"]
    log(f"[{name}] {what} on the fixed test patients | patient AUC {p['auc']:.3f} acc {p['accuracy']:.3f} "
        f"F1 {p['f1']:.3f}")
    return metrics
