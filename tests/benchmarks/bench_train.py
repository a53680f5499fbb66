"""Training engine throughput: cache decode, loader images/s, training and evaluation tuples/s; on CUDA also the time
per epoch, the projected 5-fold CV time on the 'full' synthetic tree, peak memory of one MMNet step and the largest
batch that fits in 24 GB.

python tests/benchmarks/bench_train.py [--preset demo|full] [--root DIR] [--threads N] [--csv PATH]
CPU defaults to the demo settings (config.demo_overrides) on the demo tree; CUDA to the defaults on the full tree.
"""
import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from config import Config, demo_overrides  # noqa: E402
from utils.env import resolve_device, seed_everything  # noqa: E402

GB = 2**30


def settings(device):
    cfg = Config(pretrained=False, workers=min(8, os.cpu_count() or 1))
    if device.type != "cuda":
        cfg = replace(cfg, **demo_overrides())
    return replace(cfg, synthetic=True, folds=(0,))


def prepare_tree(cfg, root, preset, work):
    from preprocess.analyze import run_analyze
    from preprocess.preprocess import run_split
    from preprocess.synthetic import make_synthetic
    start = time.time()
    if root is None:
        root = Path(work) / "data"
        make_synthetic(root, preset=preset, seed=0)
    made = time.time() - start
    cfg = replace(cfg, data_root=str(root), output_dir=str(Path(work) / "output"))
    run_analyze(cfg)
    run_split(cfg)
    return cfg, made


def timed(fn):
    start = time.time()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.time() - start


def loader_images_per_s(cfg, run, device):
    from utils.trainer import make_loader
    loader = make_loader(run["dataset"], run["train_sampler"], cfg, device, cfg.seed)
    def one_pass():
        return sum(int(mask.sum()) for _, mask, _, _ in loader)
    one_pass()
    images, seconds = timed(one_pass)
    return images / seconds


def engine_rates(cfg, run, device):
    """(training tuples/s, evaluation tuples/s, seconds per epoch incl. validation) after one warm-up epoch."""
    from backbones import build_model
    from utils.trainer import build_optimizer, build_scheduler, make_loader, precision, predict, train_epoch
    model = build_model("mmnet", **run["model_kwargs"]).to(device)
    dtype, scaler = precision(cfg, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(run["train_sampler"]))
    train = make_loader(run["dataset"], run["train_sampler"], cfg, device, cfg.seed)
    val = make_loader(run["dataset"], run["batches"]["val"], cfg, device, cfg.seed)
    evaluation = make_loader(run["dataset"], run["batches"]["test"], cfg, device, cfg.seed)
    state = dict(bad_steps=0)
    n_train = len(run["train_sampler"].group_list) * cfg.tuples_per_patient
    epoch = lambda e: train_epoch(model, train, optimizer, scheduler, scaler, run["criterion"], cfg, device,  # noqa: E731
                                  dtype, state, e)
    epoch(1)
    _, train_s = timed(lambda: epoch(2))
    _, val_s = timed(lambda: predict(model, val, device, dtype, run["criterion"]))
    _, eval_s = timed(lambda: predict(model, evaluation, device, dtype))
    return n_train / train_s, len(run["tuples"]["test"]) / eval_s, train_s + val_s


def step_memory(cfg, model, optimizer, batch, device):
    """Peak allocated bytes of one AMP training step (augmentation included) at `batch` tuples."""
    from preprocess.transforms import prepare
    from utils.trainer import autocast, precision
    dtype, scaler = precision(cfg, device)
    m, s = len(cfg.magnifications), cfg.image_size
    images = torch.randint(0, 255, (batch, m, s, s, 3), dtype=torch.uint8)
    mask = torch.ones(batch, m, dtype=torch.bool)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    x, mask = prepare(images, mask, device, train=True)
    with autocast(device, dtype):
        out = model(x, mask)
        loss = out["binary_logits"].float().mean() + out["subtype_logits"].float().mean()
    (scaler.scale(loss) if scaler else loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def fits(cfg, model, optimizer, batch, device):
    try:
        step_memory(cfg, model, optimizer, batch, device)
        return True
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False


def largest_batch(cfg, model, optimizer, device, budget_gb=24, limit=4096):
    """Largest batch whose training step fits when the process may use at most `budget_gb` GB."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GB / total), device)
    ok, bad = 0, None
    batch = cfg.batch_size
    while batch <= limit and fits(cfg, model, optimizer, batch, device):
        ok, batch = batch, batch * 2
    bad = batch if batch <= limit else None
    while bad is not None and bad - ok > 1:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(cfg, model, optimizer, mid, device) else (ok, mid)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return ok


def cuda_memory(cfg, run, device):
    from backbones import build_model
    from utils.trainer import build_optimizer
    model = build_model("mmnet", **run["model_kwargs"]).to(device).train()
    optimizer = build_optimizer(model, cfg)
    step_memory(cfg, model, optimizer, cfg.batch_size, device)
    peak = step_memory(cfg, model, optimizer, cfg.batch_size, device)
    return peak / GB, largest_batch(cfg, model, optimizer, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="synthetic tree: demo (CPU default) or full (CUDA default)")
    parser.add_argument("--root", default=None, help="an existing data tree instead of a fresh synthetic one")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device()
    preset = args.preset or ("full" if device.type == "cuda" else "demo")
    cfg = settings(device)
    seed_everything(cfg.seed)
    rows = []

    def add(metric, value, unit, note=""):
        rows.append(dict(metric=metric, value=round(value, 3), unit=unit, note=note))

    with tempfile.TemporaryDirectory() as work:
        cfg, made = prepare_tree(cfg, args.root, preset, work)
        from preprocess.cache import image_cache
        from preprocess.analyze import load_index
        from utils.experiments import prepare_run
        paths = load_index(cfg)["path"].tolist()
        _, decode_s = timed(lambda: image_cache(cfg, paths))
        run = prepare_run(cfg, "bench", "fold_0", "mmnet", {})
        setting = f"{preset} tree, {cfg.backbone} @ {cfg.image_size}px, batch {cfg.batch_size}, workers {cfg.workers}"
        if args.root is None:
            add("synthetic tree written", made, "s", f"{len(paths)} images ({preset})")
        add("cache build (decode + resize)", len(paths) / decode_s, "images/s", f"{len(paths)} PNGs, threads")
        add("loader from cache", loader_images_per_s(cfg, run, device), "images/s", setting)
        train_rate, eval_rate, epoch_s = engine_rates(cfg, run, device)
        add("training", train_rate, "tuples/s", setting)
        add("evaluation", eval_rate, "tuples/s", setting)
        add("epoch (train + validation)", epoch_s, "s", f"{len(run['train_sampler'].group_list)} groups x "
            f"{cfg.tuples_per_patient} tuples")
        if device.type == "cuda":
            eval_s = sum(len(run["tuples"][r]) for r in ("train", "val", "test")) / eval_rate
            add("projected 5-fold CV (MMNet)", 5 * (cfg.epochs * epoch_s + eval_s) / 60, "min",
                f"{cfg.epochs} epochs per fold, no early stop, + cache build once")
            peak, biggest = cuda_memory(cfg, run, device)
            add("peak GPU memory, one training step", peak, "GB", f"batch {cfg.batch_size}, AMP")
            add("largest batch in 24 GB", biggest, "tuples", f"{len(cfg.magnifications)} images each")
    table = pd.DataFrame(rows)
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {dev}; load average {os.getloadavg()[0]:.1f}")
    print(table.to_string(index=False))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
