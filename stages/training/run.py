"""One run from start to finish: train, evaluate and write its folder; skipped when already finished."""
import shutil
import time

import numpy as np

from backbones import MODELS, build_model
from stages.training.checkpoint import finish_bytes, read_checkpoint, run_bytes, save, slim_last
from stages.training.data import prepare_run
from stages.training.evaluate import evaluate
from stages.training.inner import oof_threshold, wanted
from stages.training.probe import probe_run
from stages.training.record import new_record, read_record, run_config, sources_of, stale, stale_error, write_record
from stages.training.train import fit
from utils.checks import resource_errors
from utils.env import resolve_device, seed_everything
from utils.helpers import RunFiles, log, mean_std, read_json_or_none, run_dir, write_csv, write_json
from utils.lock import RunLock, describe, owner, try_lock
from utils.scoring import BLOCKS, threshold_of

WAIT_S = 2.0


def macro_f1(block):
    """Tuple-level subtype macro-F1 as text; n/a where undefined (a one-class subtype head)."""
    value = block["tuple"]["macro_f1"] if block and block.get("tuple") else float("nan")
    return f"{value:.3f}" if np.isfinite(value) else "n/a"


def rule_of(m, rule):
    """(rule, metrics key) the console leads with: the rule in force, val_youden where the run lacks it."""
    return (rule, BLOCKS[rule]) if BLOCKS[rule] in m["test"]["patient"] else ("val_youden", "youden")


def others(m, rule):
    """Patient accuracy under the other decision rules the run has, e.g. 'val_youden 0.80, fixed_0.5 0.90'."""
    p = m["test"]["patient"]
    return ", ".join(f"{r} {p[k]['accuracy']:.3f}" for r, k in BLOCKS.items()
                     if r != rule and r != "val_sens95" and k in p)


def fold_line(tag, m, rule="val_youden"):
    rule, key = rule_of(m, rule)
    p, t = m["test"]["patient"], m["test"]["tuple"]
    thr = threshold_of(m["threshold"]["patient"], rule)
    return (f"[{tag}] TEST patient AUC {p[key]['auc']:.3f} acc {p[key]['accuracy']:.3f} "
            f"F1 {p[key]['f1']:.3f} sens {p[key]['recall']:.3f} spec {p[key]['specificity']:.3f} "
            f"({rule}, t={thr:.2f}; acc {others(m, rule)}) | tuple AUC {t['t0.5']['auc']:.3f} "
            f"acc {t[key]['accuracy']:.3f} | subtype macro-F1 {macro_f1(m['subtype'])} "
            f"(SMOTE {macro_f1(m.get('subtype_smote'))}) | {m['epochs']} epochs, best {m['best_epoch']}, "
            f"{m['train_seconds']:.0f}s")



def finished(cfg, spec, split_name, folder):
    """metrics.json of a finished run trained under this command's settings, or None when the run must be trained;
    a finished (or, with --resume, interrupted) run trained under other settings stops the command (--force retrains
    it)."""
    problem = stale(cfg, spec, split_name)
    if problem:
        raise stale_error([problem])
    metrics = read_json_or_none(RunFiles(folder).metrics)
    if metrics is None or cfg.force:
        return None
    log(f"[{spec.name}/{split_name}] finished earlier by {trained_by(folder)} under the same settings; reused (--force retrains it)")
    return metrics


def trained_by(folder):
    """pid@host of the process that trained a run folder, '' before its record is written."""
    return (read_record(folder) or {}).get("trained_by", "")


def holder(cfg, spec, split_name):
    """Who holds a run's lock, as pid@host with its start and heartbeat."""
    lock = RunLock(run_dir(cfg, spec.name, split_name))
    info = lock.held_by()
    return describe(info, lock.path) if info else "another process (its lock is already released)"


def wait_for(cfg, folder, tag):
    """The lock of a run folder, once no other live process holds it (that process may finish the run meanwhile)."""
    lock = try_lock(folder, cfg.lock_stale_s)
    if lock is not None:
        return lock
    log(f"[{tag}] is being trained by {describe(RunLock(folder).held_by())}; waiting for it")
    while lock is None:
        time.sleep(WAIT_S)
        lock = try_lock(folder, cfg.lock_stale_s)
    return lock


def run_one(cfg, spec, split_name, callback=None, wait=True, adapt=None, sources=()):
    """Train, evaluate and write one run folder under its lock; a finished run is read back unless cfg.force.
    With wait=False a run another live process holds returns None at once, to be taken up later. `adapt(run,
    device)` may change the prepared run (its criterion, say) and returns fields for metrics.json; `sources` are
    patients behind the run beyond its split and tuning study (a teacher's)."""
    folder, tag = run_dir(cfg, spec.name, split_name), f"{spec.name}/{split_name}"
    done = finished(cfg, spec, split_name, folder)
    if done is not None:
        return done
    lock = wait_for(cfg, folder, tag) if wait else try_lock(folder, cfg.lock_stale_s)
    if lock is None:
        return None
    with lock:
        done = finished(cfg, spec, split_name, folder)
        if done is not None:
            return done
        log(f"[{tag}] trained by {owner(lock.info)}")
        with resource_errors(f"run {tag}", folder=folder):
            return train_and_score(cfg, spec, split_name, folder, callback, adapt, sources)


def train_and_score(cfg, spec, split_name, folder, callback=None, adapt=None, sources=()):
    """The run under its own settings (run_config): record.json first, then training, evaluation and its files."""
    run_cfg = run_config(cfg, spec, split_name)
    seed_everything(run_cfg.seed)
    files = RunFiles(folder)
    files.metrics.unlink(missing_ok=True)
    run = prepare_run(run_cfg, spec.name, split_name, spec.model, dict(spec.flags))
    sources = sources_of(cfg, run_cfg, spec, split_name, sources)
    record = new_record(cfg, run_cfg, spec, split_name, run.model_kwargs, sources)
    write_record(folder, record)
    device = resolve_device(run_cfg.device)
    extra = adapt(run, device) if adapt is not None else {}
    fit = FITS[MODELS[spec.model].fit]
    predictions, metrics = fit(run_cfg, spec, run, device, sources, callback)
    metrics.update(extra)
    with resource_errors(f"run {run.tag}", folder=folder, needs_bytes=finish_bytes(folder, len(predictions))):
        finish_checkpoint(folder, metrics["threshold"]["patient"], run_cfg.threshold_rule, record)
        write_csv(predictions, files.predictions, index=False)
        write_json(files.metrics, metrics)
        slim_last(folder)
    log(fold_line(run.tag, metrics, run_cfg.threshold_rule))
    return metrics


def train_model(cfg, spec, run, device, sources, callback=None):
    """Fit and score a gradient-trained model; a full disk on the way says about how much the run needs."""
    model = build_model(spec.model, **run.model_kwargs)
    log(f"[{run.tag}] {spec.model} | {len(run.train_sampler.group_list)} train groups x {cfg.tuples_per_patient} "
        f"tuples/epoch | val {len(run.tuples['val'])} / test {len(run.tuples['test'])} tuples | device {device}")
    rows = len(run.tuples["val"]) + len(run.tuples["test"])
    with resource_errors(f"run {run.tag}", folder=run.folder, needs_bytes=run_bytes(model, rows)):
        state = fit(cfg, model, run, device, callback)
        if not wanted(cfg, spec):
            return evaluate(cfg, model, run, device, state, sources)
        oof, seconds = oof_threshold(cfg, spec, run.split, device)
        predictions, metrics = evaluate(cfg, model, run, device, state, sources, oof)
    metrics["inner"] = dict(folds=cfg.inner_folds, seconds=seconds)
    return predictions, metrics


def fit_probe(cfg, spec, run, device, sources, callback=None):
    return probe_run(cfg, run, sources)


FITS = dict(gradient=train_model, probe=fit_probe)


def finish_checkpoint(folder, thresholds, rule, record):
    """What best.pth needs to decide on new patients alone: the patient-level thresholds (`decision` under the rule
    in force, `threshold_rule`, and the validation ones), and the run's record, so predict, export and the service
    can say which run and settings a decision comes from."""
    best = RunFiles(folder).best
    if not best.exists():
        return
    ckpt = read_checkpoint(best)
    ckpt["threshold_rule"] = rule
    ckpt["threshold"] = {**{k: float(v) for k, v in thresholds.items()}, "decision": threshold_of(thresholds, rule)}
    ckpt["record"] = record
    save(ckpt, best)


def spread(values):
    """Mean ± std (over splits) of some values, as table 1 gives them (the value alone for one split)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return "n/a"
    return mean_std(values.mean(), values.std(ddof=1) if len(values) > 1 else np.nan)


def summary_line(run_name, results, rule="val_youden"):
    rule, key = rule_of(results[0], rule)
    pick = lambda name, k=key: [r["test"]["patient"][k][name] for r in results if k in r["test"]["patient"]]  # noqa: E731
    rest = ", ".join(f"{r} {spread(pick('accuracy', k))}" for r, k in BLOCKS.items()
                     if r not in (rule, "val_sens95") and pick("accuracy", k))
    return (f"[{run_name}] {len(results)} split(s) | test patient AUC {spread(pick('auc'))} | "
            f"acc {spread(pick('accuracy'))} | F1 {spread(pick('f1'))} ({rule}) | acc {rest}")


def copy_best(cfg, name, split_name, target):
    """Copy a run's best checkpoint to `target` (output/models/...)."""
    best = RunFiles(run_dir(cfg, name, split_name)).best
    if not best.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, target)

