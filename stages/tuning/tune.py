"""Hyperparameter tuning (--stages tune): an Optuna study (TPE sampler, median pruning on the per-epoch validation AUC)
kept in a journal file under output/tuning/, shared by --jobs processes and torchrun ranks and resumed when rerun;
then trials.csv, best_config.json (the best settings, with the study's patients) and the optimisation plots. Nested by
construction: the default study tunes on the fixed split's train+val patients only (honest for the fixed split);
--tune-scope per_fold runs one study per CV fold on that fold's train+val patients (nested cross-validation)."""
import hashlib
import json
import os
import socket
import time
import warnings
from dataclasses import asdict

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import MaxTrialsCallback
from optuna.trial import FixedTrial, TrialState

from backbones import REFERENCE_MODEL
from config import of_kind
from stages.training.record import shaping
from stages.training.schedule import all_ok, job_count, process_pool, rank, start_worker, world_size
from stages.training.stage import checked_cv_names
from stages.tuning.space import load_space, space_key, suggest
from stages.tuning.trial import INNER, Objective, study_splits, trial_config, tuning_dir
from utils.config_file import STUDY_KEY
from utils.helpers import PipelineError, log, require, split_path, warn, write_csv, write_json
from utils.scoring import union_seen
from utils.lock import alive
from utils.plottings import save

STARTUP_TRIALS = 5
# the control and compute fields best_config.json keeps; it leaves out the others (NOT_SETTINGS)
CARRIED = ("data_root", "demo", "synthetic", "lock_stale_s", "tensorboard", "amp", "precision", "channels_last",
           "fused_adamw", "compile", "compile_backend")
NOT_SETTINGS = tuple(k for k in of_kind("control", "compute") if k not in CARRIED)


def outers(cfg):
    """The splits whose training patients a study tunes on: the fixed split, or each selected CV fold."""
    if cfg.tune_scope == "fixed":
        require(split_path(cfg, "fixed"), "split")
        return ["fixed"]
    return checked_cv_names(cfg)


def study_name(cfg, space, outer, splits):
    """The reference model, the outer split and a digest of every setting the objective depends on (the search space
    and the patients of the inner `splits` included): a rerun with the same settings continues the same study, other
    settings start another."""
    patients = {name: split[["patient_id", "role"]].values.tolist() for name, split in splits.items()}
    digest = hashlib.sha1(json.dumps([shaping(cfg), space_key(space), patients], sort_keys=True, default=str).encode())
    return f"{REFERENCE_MODEL}_{outer}_{digest.hexdigest()[:8]}"


def storage(cfg):
    path = tuning_dir(cfg) / "journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def sampler(cfg, offset):
    """TPE, seeded per process and per rerun so no two draw the same start-up trials."""
    return optuna.samplers.TPESampler(seed=cfg.seed + offset, n_startup_trials=STARTUP_TRIALS, constant_liar=True)


def pruner(cfg):
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=max(1, cfg.epochs // 2))


def open_study(cfg, name, store, offset=0):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(study_name=name, storage=store, direction="maximize", sampler=sampler(cfg, offset),
                               pruner=pruner(cfg), load_if_exists=True)


def fail_stale(study, store):
    """Trials left RUNNING by a process of this host that is gone (killed, out of memory) are marked failed."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or pid <= 0 or alive(pid):
            continue
        store.set_trial_user_attr(t._trial_id, "error", "interrupted: its process is gone")
        store.set_trial_state_values(t._trial_id, TrialState.FAIL)
        log(f"[tune] trial {t.number} was left running by process {pid}, which is gone; marked failed")


def trial_line(study, trial):
    value = f"{trial.value:.4f}" if trial.value is not None else trial.user_attrs.get("error", "")
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    best = ""
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = f" | best {study.best_value:.4f} (trial {study.best_trial.number})"
    return f"[tune] trial {trial.number} {trial.state.name} {value}{best} | {params}"


def optimize(cfg, space, outer, name, goal, worker):
    """Trials from this process until the study holds `goal` trials or --tune-minutes have passed."""
    study = open_study(cfg, name, storage(cfg), offset=goal + worker)
    objective = Objective(cfg, space, outer, tuning_dir(cfg, outer) / name, worker)
    callbacks = [MaxTrialsCallback(goal, states=None), lambda s, t: log(trial_line(s, t))]
    study.optimize(objective, timeout=cfg.tune_minutes * 60 or None, catch=(Exception,), callbacks=callbacks,
                   gc_after_trial=True)


def worker(cfg, space, outer, name, goal, index, threads, parent):
    """One tuning process: its own log under the study's folder, trials through the shared journal."""
    start_worker(parent, threads, tuning_dir(cfg, outer) / name / f"worker{index}.log")
    optimize(cfg, space, outer, name, goal, index)


def run_workers(cfg, space, outer, name, goal, jobs):
    first = rank() * jobs
    log(f"[tune] {jobs} processes share the study; each logs to {tuning_dir(cfg, outer) / name}/worker<N>.log")
    pool, threads = process_pool(jobs)
    futures = [pool.submit(worker, cfg, space, outer, name, goal, first + j, threads, os.getpid()) for j in range(jobs)]
    errors = [f.exception() for f in futures]
    errors = [e for e in errors if e is not None]
    if errors:
        raise PipelineError(f"{len(errors)} tuning process(es) stopped ({type(errors[0]).__name__}: {errors[0]}); "
                            f"finished trials are kept in {tuning_dir(cfg) / 'journal.log'}: rerun to continue")


def run_tune(cfg):
    """Stage: this process's (or rank's) trials of each study; alone it also writes the outputs, under torchrun
    main.py does once every rank is done."""
    space = load_space(cfg)
    if cfg.selection != "swa":
        log(f"[tune] trials keep their weights by swa (a fixed schedule), not --selection {cfg.selection}: the "
            f"validation patients that score a trial must not also choose its epoch; best_config.json says swa")
    for outer in outers(cfg):
        tune_one(cfg, space, outer)
    if world_size() == 1:
        finish_tune(cfg)


def tune_one(cfg, space, outer):
    """--tune-trials more trials of the study of one outer split."""
    splits = study_splits(cfg, outer)
    name = study_name(cfg, space, outer, splits)
    store = storage(cfg)
    study = open_study(cfg, name, store)
    if rank() == 0:
        fail_stale(study, store)
    before = len(study.trials)
    if not all_ok(True):
        raise PipelineError("the torchrun ranks could not open the tuning study together")
    log(f"[tune] study {name}: {before} earlier trial(s); {cfg.tune_trials} more on {', '.join(splits)} (objective: "
        f"validation patient AUC on the {outer} split's train+val patients; its test patients unread)")
    start = time.time()
    jobs = job_count(cfg)
    if jobs <= 1:
        optimize(cfg, space, outer, name, before + cfg.tune_trials, rank())
    else:
        run_workers(cfg, space, outer, name, before + cfg.tune_trials, jobs)
    log(f"[tune] {time.time() - start:.0f} s of tuning on rank {rank()}")


def trials_frame(study):
    frame = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "duration", "params",
                                          "user_attrs"))
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds().round(1)
    names = {c: c.removeprefix("params_").removeprefix("user_attrs_") for c in frame.columns}
    return frame.rename(columns={**names, "duration": "seconds"}).assign(study=study.study_name)


def best_config(cfg, space, study, outer, splits):
    """Every setting of the best trial (run controls such as --stages left out), readable by --config, with the study
    that chose them and every patient it trained or validated on (the leak guard of every run trained with them)."""
    values = suggest(FixedTrial(study.best_trial.params), space)
    settings = asdict(trial_config(cfg, values))
    keep = {k: v for k, v in settings.items() if k not in NOT_SETTINGS}
    seen = union_seen([{r: split.loc[split["role"] == r, "patient_id"] for r in INNER} for split in splits.values()])
    block = dict(study=study.study_name, scope=cfg.tune_scope, outer=outer, splits=list(splits),
                 tuned=[*values, "selection"], seen_patients=seen)
    return {**{k: keep[k] for k in values}, **keep, STUDY_KEY: block}


def plot(path, draw, study):
    """One Optuna matplotlib figure saved as a PNG; skipped with a warning when the study cannot show it yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = draw(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        warn(f"{path.name} not drawn ({e})")
        return
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(8, 5)
    save(fig, path)


def plots(folder, seed, study):
    vis = optuna.visualization.matplotlib
    importance = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    plot(folder / "optimization_history.png", vis.plot_optimization_history, study)
    plot(folder / "param_importances.png", lambda s: vis.plot_param_importances(s, evaluator=importance), study)
    plot(folder / "intermediate_values.png", vis.plot_intermediate_values, study)


def finish_tune(cfg):
    """trials.csv, best_config.json and the plots of each study this configuration tunes."""
    space = load_space(cfg)
    for outer in outers(cfg):
        finish_one(cfg, space, outer)


def finish_one(cfg, space, outer):
    splits = study_splits(cfg, outer)
    study = optuna.load_study(study_name=study_name(cfg, space, outer, splits), storage=storage(cfg))
    folder = tuning_dir(cfg, outer)
    write_csv(trials_frame(study), folder / "trials.csv", index=False)
    states = [t.state for t in study.trials]
    counts = ", ".join(f"{s.name.lower()} {states.count(s)}" for s in TrialState if states.count(s))
    log(f"[tune] study {study.study_name}: {len(states)} trials ({counts}) -> {folder / 'trials.csv'}")
    if TrialState.COMPLETE not in states:
        raise PipelineError(f"no tuning trial finished (see the error column of {folder / 'trials.csv'}); "
                            f"fix the settings it names and rerun --stages tune")
    write_json(folder / "best_config.json", best_config(cfg, space, study, outer, splits))
    plots(folder, cfg.seed, study)
    best = study.best_trial
    log(f"[tune] best trial {best.number}: mean validation patient AUC {best.value:.4f} over "
        f"{len(splits)} inner split(s) | " + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    use = ("--stages cv --tuned-folds " + str(tuning_dir(cfg))) if outer != "fixed" else \
        f"--config {folder / 'best_config.json'} --stages fixed"
    log(f"[tune] train with these settings: python main.py {use}")
