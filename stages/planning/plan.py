"""--plan: what the command would do, before it does it. Every training unit it would train, reuse, refuse or skip
(run, split, model, epochs, optimiser steps, images per step), the peak disk it needs against the free disk, and its
wall time per stage from a short measurement on this device. Trains nothing."""
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from backbones import MODELS, model_config
from preprocess.analyze import load_index, subtype_classes
from preprocess.cache import cache_folder, cache_path, field_shape
from preprocess.transforms import ORIENTATIONS
from preprocess.tuples import eval_tuples, groups
from stages.training.robustness import RUNS as ROBUST_RUNS, conditions
from stages.training import measure
from stages.training.protocol import FOLDER as PROTOCOL, protocol_config, write_protocol
from stages.training.data import reads_features, split_frames
from stages.training.inner import wanted
from stages.training.record import run_config, stale, tuning_leak
from stages.training.schedule import job_count
from stages.training.stage import TRAINING, stage_units, weights_missing
from stages.training.train import validates
from utils.env import resolve_device
from utils.helpers import RunFiles, index_path, log, run_dir, split_path

GB = 1e9
ADAMW_COPIES = 3  # a running unit's last.pth holds the weights and AdamW's two moments
KEPT_COPIES = 2  # a finished unit keeps best.pth and a last.pth without the optimiser state
RUN_FILES_BYTES = 5e5  # predictions, metrics and curves of one run folder
STAGE_S = dict(explain=2.0, report=0.6)  # per explained tuple, per unit: CPU seconds measured on the demo


@dataclass
class Unit:
    """One (run, split) of a training stage and what the command would do with it."""
    stage: str
    run: str
    split: str
    model: str
    action: str
    why: str = ""
    epochs: int = 0
    steps: int = 0
    images_per_step: int = 0
    val_tuples: int = 0
    eval_tuples: int = 0
    val_passes: int = 0
    inner: int = 0
    spec: object = None
    cfg: object = None
    seconds: float = 0.0


def action_of(cfg, spec, split):
    """('refuse', why) for a run trained under other settings or a leaky tuning study, ('reuse', '') for a finished
    run, ('skip', why) for a baseline whose weights cannot be had, else ('train', '')."""
    problem = tuning_leak(cfg, spec, split) or stale(cfg, spec, split)
    if problem:
        return "refuse", problem
    if RunFiles(run_dir(cfg, spec.name, split)).metrics.exists() and not cfg.force:
        return "reuse", ""
    if weights_missing(cfg, spec):
        return "skip", f"no ImageNet weights for {spec.flags.get('backbone')} here"
    return "train", ""


def steps_per_epoch(n_groups, per_group, batch):
    full, rest = divmod(n_groups * per_group, batch)
    return full + (rest > 1 or (rest == 1 and full == 0))


def val_passes(cfg):
    """Validation passes of one run: every epoch for a rule that selects on them, fewer under swa (train.validates)."""
    rule = SimpleNamespace(early_stop=cfg.selection != "swa")
    return sum(validates(cfg, rule, epoch) for epoch in range(1, cfg.epochs + 1))


def unit_of(cfg, stage, spec, split):
    """The unit with its counts from the saved split: optimiser steps, images per step, tuples evaluated."""
    action, why = action_of(cfg, spec, split)
    run_cfg = run_config(cfg, spec, split)
    unit = Unit(stage, spec.name, split, spec.model, action, why, spec=spec, cfg=cfg)
    if not split_path(cfg, split).exists():
        return unit
    index, parts = split_frames(run_cfg, split)
    settings = model_config(run_cfg, spec.model, len(subtype_classes(index)), **spec.flags)
    slots, pool = tuple(settings.magnifications), tuple(run_cfg.magnifications)
    unit.val_tuples = len(eval_tuples(parts["val"], slots, pool))
    unit.eval_tuples = unit.val_tuples + len(eval_tuples(parts["test"], slots, pool))
    if MODELS[spec.model].fit != "gradient":
        return unit
    per_epoch = steps_per_epoch(len(groups(parts["train"], slots, pool)), run_cfg.tuples_per_patient,
                                run_cfg.batch_size)
    unit.epochs = run_cfg.epochs
    unit.steps = run_cfg.epochs * math.ceil(per_epoch / run_cfg.accum_steps)
    unit.images_per_step = run_cfg.batch_size * run_cfg.accum_steps * len(slots)
    unit.val_passes = val_passes(run_cfg)
    unit.inner = run_cfg.inner_folds if wanted(run_cfg, spec) else 0
    return unit


def plan_units(cfg, stages):
    """Every unit of the command's training stages, in the order they would run (the list gpu_check counts)."""
    units = [unit_of(cfg, stage, spec, split) for stage in stages if stage in TRAINING
             for spec, split in stage_units(cfg, stage)]
    return units + protocol_units(cfg) if PROTOCOL in stages else units


def protocol_units(cfg):
    """The protocol stage's units: its image-level splits written first (as the stage does), then its cv and
    baselines units under output/protocol/."""
    pcfg = protocol_config(cfg)
    if index_path(cfg).exists():
        write_protocol(cfg, pcfg)
    return [unit_of(pcfg, PROTOCOL, spec, split) for stage in ("cv", "baselines")
            for spec, split in stage_units(pcfg, stage)]


def shape_key(unit):
    return unit.spec.model, tuple(sorted(unit.spec.flags.items(), key=str)), str(run_config(unit.cfg, unit.spec,
                                                                                            unit.split))


def measured_shapes(units, index, device):
    """One measurement per distinct model shape among the units to train."""
    classes = len(subtype_classes(index))
    shapes = {}
    for unit in units:
        key = shape_key(unit)
        if unit.action == "train" and key not in shapes:
            run_cfg = run_config(unit.cfg, unit.spec, unit.split)
            shapes[key] = measure.measure_shape(run_cfg, unit.spec, classes, field_of(run_cfg, index), device)
    return shapes


def field_of(cfg, index):
    return field_shape(index["width"], index["height"], cfg.image_size)


def unit_seconds(unit, shape, fixed_s):
    """Steps and evaluation of one unit (inner models as as many shorter runs) plus the fixed cost of a unit."""
    train = unit.steps * shape.step_s * (1 + unit.inner * 0.8)
    evaluate = (unit.val_tuples * unit.val_passes + unit.eval_tuples) * shape.eval_tuple_s
    return shape.build_s + train + evaluate + fixed_s


def fixed_seconds(units, shapes):
    """A unit's cost beyond its model, steps and evaluated tuples (data, scoring, bootstrap, files): one real unit of
    the first model to train, one epoch of one tuple per patient, less what the shape measurement accounts for."""
    first = next((u for u in units if u.action == "train" and u.steps), None)
    if first is None:
        return 0.0
    shape = shapes[shape_key(first)]
    whole = measure.unit_overhead_s(run_config(first.cfg, first.spec, first.split), first.spec, first.split)
    return max(0.0, whole - shape.build_s - (first.eval_tuples + first.val_tuples) * shape.eval_tuple_s)


def cache_bytes(cfg, index, units):
    """Bytes of the image cache and, where a unit reads them, the frozen-feature caches, that are not on disk yet."""
    height, width = field_of(cfg, index)
    paths = index["path"].astype(str).tolist()
    image = 0 if cache_path(cache_folder(cfg), (height, width), cfg.stain_norm, paths).exists() else \
        len(paths) * height * width * 3
    frozen = any(u.action == "train" and reads_features(cfg, u.model) for u in units)
    features = len(paths) * ORIENTATIONS * 1280 * max(1, height // 32) * max(1, width // 32) * 2 if frozen else 0
    return image, features


def free_bytes(folder):
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


@dataclass
class Estimate:
    stages: dict
    disk: float
    free: float
    device: str


def measured_costs(units, index, device, parallel):
    """(shapes, a unit's fixed seconds), measured with the CPU threads each of `parallel` jobs gets. The fixed unit
    builds the image cache (and frozen features) the command would build first, so the command reuses them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // parallel))
    try:
        shapes = measured_shapes(units, index, device)
        return shapes, fixed_seconds(units, shapes)
    finally:
        torch.set_num_threads(threads)


def estimate(cfg, stages, units, measured):
    """Seconds per stage and peak disk of the command, from a measurement of every shape it trains on this device;
    `measured` the seconds of the stages the plan ran itself (analyze, split). Jobs on a CPU each get their share of
    the cores (measured at that share); on a GPU they share one device and count as one stream."""
    device = resolve_device(cfg.device)
    index = load_index(cfg)
    jobs = job_count(cfg)
    busiest = max([sum(u.stage == s and u.action == "train" for u in units) for s in stages] + [1])
    parallel = min(jobs, busiest) if device.type == "cpu" else 1
    image, features = cache_bytes(cfg, index, units)
    shapes, fixed_s = measured_costs(units, index, device, parallel)
    start_s = measure.worker_start_s()
    seconds = dict(start=start_s, **measured)
    for stage in stages:
        mine = [u for u in units if u.stage == stage]
        for u in mine:
            u.seconds = unit_seconds(u, shapes[shape_key(u)], fixed_s) if u.action == "train" else 0.0
        if stage in TRAINING + (PROTOCOL,):
            pooled = min(jobs, sum(u.action == "train" for u in mine)) > 1
            seconds[stage] = sum(u.seconds for u in mine) / (parallel if pooled else 1) + start_s * pooled
            start_s = 0.0 if pooled else start_s
        elif stage == "robustness":
            seconds[stage] = robustness_seconds(cfg, units, shapes)
        elif stage in STAGE_S:
            per = dict(explain=cfg.explain_samples * 4, report=len(units))[stage]
            seconds[stage] = per * STAGE_S[stage]
    weights = [shapes[shape_key(u)].weight_bytes for u in units if u.action == "train"]
    running = jobs * max(weights, default=0) * (1 + ADAMW_COPIES)
    checkpoints = sum(w * KEPT_COPIES + RUN_FILES_BYTES for w in weights) + running
    return Estimate(seconds, (image + features + checkpoints) / GB, free_bytes(cfg.output_dir) / GB,
                    describe(device, jobs))


def robustness_seconds(cfg, units, shapes):
    """Every condition's pass over the test tuples of the CV folds the robustness stage scores."""
    scored = [u for u in units if u.stage in TRAINING and u.run in ROBUST_RUNS and u.split.startswith("fold_")
              and u.action == "train"]
    n = len(conditions(cfg.magnifications))
    return sum((u.eval_tuples - u.val_tuples) * n * shapes[shape_key(u)].eval_tuple_s for u in scored)


def describe(device, jobs):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return f"{name}, {jobs} job{'s' if jobs > 1 else ''}"


def unit_line(u):
    steps = f"{u.epochs} ep, {u.steps} steps x {u.images_per_step} images" if u.steps else "fit on cached features"
    inner = f", +{u.inner} inner models" if u.inner else ""
    why = f" ({u.why})" if u.why else ""
    return f"  {u.action:<6} {u.stage:<9} {u.run}/{u.split} [{u.model}] {steps}{inner}, {u.eval_tuples} eval tuples" \
           f"{f', est. {u.seconds:.0f} s' if u.seconds else ''}{why}"


def plan_line(units, est):
    train = sum(u.action == "train" for u in units)
    reused = sum(u.action == "reuse" for u in units)
    minutes = sum(est.stages.values()) / 60
    return (f"plan: {len(units)} units ({train} to train, {reused} reused), est. {minutes:.1f} min on {est.device}, "
            f"peak disk {est.disk:.1f} GB (free {est.free:.1f} GB)")


def show_plan(cfg, stages, measured=None):
    """Print the plan of the command (once its analyze and split outputs exist) and return its units."""
    units = plan_units(cfg, stages)
    est = estimate(cfg, stages, units, measured or {})
    log(f"Plan of the command: {len(units)} training units, stages {', '.join(stages)}")
    for u in units:
        log(unit_line(u))
    for stage, seconds in est.stages.items():
        log(f"  est. {stage:<10} {seconds / 60:6.1f} min")
    refused = [u for u in units if u.action == "refuse"]
    if refused:
        log(f"WARNING: {len(refused)} unit(s) would stop the command: trained under other settings (add --force to "
            f"retrain them)")
    if est.disk > est.free:
        log(f"WARNING: the run needs about {est.disk:.1f} GB under {cfg.output_dir} but {est.free:.1f} GB are free; "
            f"free some space or point --output-dir / --cache-dir at a larger volume")
    log(plan_line(units, est))
    return units
