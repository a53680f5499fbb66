"""A short measurement on this device at the command's settings: seconds per training step and per evaluated tuple of
each distinct model shape, its weights' size and peak memory, the fixed cost of one real unit and the cost of starting a
worker process."""
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from backbones import MODELS, build_model, model_config
from preprocess.cache import cache_folder
from preprocess.transforms import ORIENTATIONS, prepare, tta_views
from stages.training.forward import autocast
from stages.training.run import run_one
from utils.env import amp_dtype
from utils.helpers import index_path, split_path

STEPS = 3  # timed training steps per shape, after one warm-up step


@dataclass
class Shape:
    """What one kind of run costs here: seconds per optimiser step and per evaluated tuple, weights in bytes, peak
    device memory of a step (GPU only, else 0)."""
    step_s: float
    eval_tuple_s: float
    build_s: float
    weight_bytes: int
    peak_bytes: int


def fake_batch(batch, slots, field, device):
    """Random uint8 fields (B, slots, H, W, 3) with every slot present."""
    images = torch.randint(0, 256, (batch, slots, *field, 3), dtype=torch.uint8)
    return images, torch.ones(batch, slots, dtype=torch.bool)


def timed(fn, device, repeats):
    """The fastest of `repeats` calls after one warm-up, synchronised on a GPU."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_shape(cfg, spec, num_subtypes, field, device):
    """Build the run's model and time its training step (augmented crops) and its evaluation (whole fields, every
    test-time view) on random fields of the command's shape; a probe's fit is counted as evaluation only."""
    start = time.perf_counter()
    settings = model_config(cfg, spec.model, num_subtypes, **spec.flags)
    model = build_model(spec.model, settings).to(device)
    build_s = time.perf_counter() - start
    slots, norm = len(settings.magnifications), model.normalization
    images, mask = fake_batch(cfg.batch_size, slots, field, device)
    dtype = amp_dtype(device) if cfg.amp else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = 0.0
    if MODELS[spec.model].fit == "gradient":
        step_s = timed(lambda: train_step(model, images, mask, device, dtype, norm), device, STEPS)
    views = ORIENTATIONS if cfg.tta else 1
    eval_s = timed(lambda: eval_batch(model, images, mask, device, dtype, norm, views), device, 1)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return Shape(step_s, eval_s / cfg.batch_size, build_s, weight_bytes, peak)


def train_step(model, images, mask, device, dtype, norm):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    x, m = prepare(images, mask, device, train=True, **norm)
    with autocast(device, dtype):
        out = model(x, m)
    loss = out["binary_logits"].float().mean() + out["subtype_logits"].float().logsumexp(1).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(g, alpha=1e-12)


@torch.no_grad()
def eval_batch(model, images, mask, device, dtype, norm, views):
    model.eval()
    x, m = prepare(images, mask, device, train=False, **norm)
    with autocast(device, dtype):
        for view in tta_views(x)[:views]:
            model(view, m)


def unit_overhead_s(cfg, spec, split):
    """Seconds of one real unit trained for one epoch of one tuple per patient into a scratch output folder (the
    command's index, splits and caches): data, model, one short epoch, evaluation, scores and files."""
    with tempfile.TemporaryDirectory(prefix="plan_") as scratch:
        shutil.copy(index_path(cfg), Path(scratch) / "index.csv")
        shutil.copytree(Path(split_path(cfg, split)).parent, Path(scratch) / "splits")
        small = replace(cfg, output_dir=scratch, cache_dir=str(cache_folder(cfg)), epochs=1, warmup_epochs=1,
                        tuples_per_patient=1, force=True, resume=False, jobs=1)
        start = time.perf_counter()
        with quiet():
            run_one(small, spec, split)
        return time.perf_counter() - start


@contextmanager
def quiet():
    """The pipeline's log lines of a measurement kept off the console."""
    logger = logging.getLogger("pipeline")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def worker_start_s():
    """Seconds a fresh Python process takes to import what a training worker imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import stages.training.run"], check=False, capture_output=True)
    return time.perf_counter() - start


