"""Training stages: the reference model on the CV folds and the fixed split, baselines and ablations, same tuples."""
from backbones import create_backbone
from preprocess.preprocess import cv_split_names, member_split_names
from stages.training.run import copy_best, summary_line
from stages.training.ensemble import member_ensemble
from stages.training.record import stale, stale_error, tuning_error, tuning_leak
from stages.training.runs import REFERENCE, TEACHER, stage_runs
from stages.training.schedule import run_units, world_size
from utils.helpers import PipelineError, RunFiles, log, models_dir, read_json, require, run_dir, split_path, warn

TRAINING = ("cv", "fixed", "baselines", "ablations", "distill")


def checked_cv_names(cfg):
    """CV split names, after checking the 'split' stage has written them."""
    names = list(cv_split_names(cfg))
    for name in names:
        require(split_path(cfg, name), "split")
    return names


def stage_splits(cfg, stage, spec):
    """The splits a stage trains a run on: table 2's ensemble members the member splits of the fixed split, fixed and
    distill the fixed split, the others the selected CV folds."""
    if spec.members:
        return member_split_names(cfg)
    return ["fixed"] if stage in ("fixed", "distill") else cv_split_names(cfg)


def stage_units(cfg, stage):
    """(spec, split) of every run a training stage (or distill: the student) trains, in the order of the run list."""
    specs = [spec for spec in stage_runs(cfg, stage) if spec.name != TEACHER]
    return [(spec, split) for spec in specs for split in stage_splits(cfg, stage, spec)]


def check_units(cfg, stages):
    """Before anything trains: stop when a run the command would reuse was trained under other settings (naming each
    run and setting), or when the tuning study behind a run's settings saw its test patients."""
    units = [(spec, split) for stage in stages if stage in TRAINING for spec, split in stage_units(cfg, stage)
             if split_path(cfg, split).exists()]
    leaks = [p for p in (tuning_leak(cfg, *unit) for unit in units) if p]
    if leaks:
        raise tuning_error(leaks)
    problems = [p for p in (stale(cfg, *unit) for unit in units) if p]
    if problems:
        raise stale_error(problems)


def keep_best(cfg, spec, split):
    """The reference model's best checkpoints: per fold under models/checkpoints, the fixed split's as best_model.pth."""
    if spec.name != REFERENCE:
        return
    target = models_dir(cfg) / ("best_model.pth" if split == "fixed" else f"checkpoints/{REFERENCE}_{split}.pth")
    copy_best(cfg, spec.name, split, target)


def weights_missing(cfg, spec):
    """A baseline on its own pretrained backbone (ResNet50) whose weights cannot be had here, e.g. offline with the
    main backbone from --pretrained-path: skipped with a warning instead of failing the stage."""
    backbone = spec.flags.get("backbone")
    if not cfg.pretrained or not backbone or backbone == cfg.backbone:
        return False
    try:
        create_backbone(backbone, pretrained=True)
    except PipelineError as e:
        reason = str(e).split("(", 1)[-1].split(")", 1)[0]
        warn(f"{spec.name} skipped: the ImageNet weights of its backbone '{backbone}' cannot be loaded here "
             f"({reason}). Run once with network (timm caches them), or pass --no-pretrained; the other runs go on.")
        return True
    return False


def run_training(cfg, stage):
    """Stage cv, fixed, baselines or ablations: this process's share of the stage's (run, split) units, in the fixed
    order of the run list; alone (no torchrun) it also finishes the stage, under torchrun main.py does once every rank
    is done. cv: MMNet on every selected fold; fixed: MMNet on the fixed split (its best checkpoint becomes
    models/best_model.pth) and table 2's ensemble members; baselines: simple concatenation, each magnification alone,
    ResNet50 transfer and the linear probe; ablations: MMNet without each component and on each magnification."""
    units = [(spec, split) for spec, split in stage_units(cfg, stage) if not weights_missing(cfg, spec)]
    for split in dict.fromkeys(split for _, split in units):
        require(split_path(cfg, split), "split")
    run_units(cfg, units)
    if world_size() == 1:
        finish_stage(cfg, stage)


def finish_stage(cfg, stage):
    """After every rank's runs: the reference model's best checkpoints, one summary line per run, table 2's
    ensemble."""
    for spec in stage_runs(cfg, stage):
        splits = stage_splits(cfg, stage, spec)
        files = [RunFiles(run_dir(cfg, spec.name, split)) for split in splits]
        if not all(f.metrics.exists() for f in files):
            continue
        results = [read_json(f.metrics) for f in files]
        for split in splits:
            keep_best(cfg, spec, split)
        name = spec.name if stage != "fixed" or spec.members else f"{spec.name} fixed"
        log(summary_line(name, results, cfg.threshold_rule))
    if stage == "fixed" and any(spec.members for spec in stage_runs(cfg, stage)):
        member_ensemble(cfg)
