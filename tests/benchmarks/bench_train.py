"""Training engine throughput: cache build, ImageBank gather, training and evaluation tuples/s, peak memory; on CUDA
also the projected 5-fold CV time on the 'full' synthetic tree and the largest batch that fits in 24 GB.

python tests/benchmarks/bench_train.py [--preset demo|full] [--root DIR] [--device D] [--threads N] [--compile]
    [--csv PATH]
CPU defaults to the demo settings (config.demo_overrides) on the demo tree; CUDA to the defaults on the full tree.
"""
import argparse
import os
import re
import resource
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
    """Demo settings on CPU, the defaults on CUDA; random init, fold 0."""
    cfg = Config(pretrained=False, device=str(device))
    if device.type != "cuda":
        cfg = replace(cfg, **demo_overrides())
    return replace(cfg, synthetic=True, folds=(0,))


def prepare_tree(cfg, root, preset, work):
    """A synthetic tree (or `root`) indexed and split under `work`; returns (config, seconds to write the tree)."""
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device=torch.device("cpu")):
    """(value, wall seconds) of fn(), waiting for the device's queued work."""
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def reset_peak(device):
    """Start a fresh peak-memory window: GPU allocator stats on CUDA, the process's peak RSS (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb():
    """Peak resident memory since the last reset_peak (VmHWM), or of the whole process where that is unavailable."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024 / GB
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def peak_gpu_gb(device):
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")


def place(model, cfg, device):
    """The model on the device as fit() places it; returns the training forward (compiled when cfg.compile on CUDA)."""
    model.to(device)
    if device.type != "cuda":
        return model
    torch.backends.cudnn.benchmark = True
    model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


def gather_rates(run, device):
    """(images/s of ImageBank.gather alone, images/s of gather + prepare with augmentation) over one training epoch."""
    from preprocess.transforms import prepare
    batches = list(run.train_sampler)
    images = sum(int((rows >= 0).sum()) for rows, _, _ in batches)
    gather = lambda: [run.bank.gather(rows, device) for rows, _, _ in batches]  # noqa: E731
    augment = lambda: [prepare(*run.bank.gather(r, device), device, train=True) for r, _, _ in batches]  # noqa: E731
    gather()
    augment()
    return images / timed(gather, device)[1], images / timed(augment, device)[1]


def engine_rates(cfg, run, device):
    """(training tuples/s, evaluation tuples/s, seconds per epoch incl. validation) after one warm-up epoch."""
    from backbones import build_model
    from stages.training.forward import predict
    from stages.training.train import TrainState, optimisation, train_epoch
    model = build_model(run.model_name, **run.model_kwargs)
    forward = place(model, cfg, device)
    opt = optimisation(model, cfg, device, len(run.train_sampler))
    state = TrainState()
    n_train = sum(len(labels) for _, labels, _ in run.train_sampler)

    def epoch(e):
        run.train_sampler.set_epoch(e)
        return train_epoch(model, forward, run, opt, cfg, device, state, e)

    epoch(1)
    _, train_s = timed(lambda: epoch(2), device)
    _, val_s = timed(lambda: predict(model, run.bank, run.batches["val"], device, opt.dtype, run.criterion), device)
    _, eval_s = timed(lambda: predict(model, run.bank, run.batches["test"], device, opt.dtype), device)
    return n_train / train_s, len(run.tuples["test"]) / eval_s, train_s + val_s


def step_memory(cfg, model, optimizer, batch, device):
    """Peak allocated bytes of one AMP training step (augmentation included) at `batch` tuples."""
    from preprocess.cache import field_shape
    from preprocess.transforms import prepare
    from stages.training.forward import amp_settings, autocast
    dtype, scaler = amp_settings(cfg, device)
    m, (h, w) = len(cfg.magnifications), field_shape([700], [460], cfg.image_size)
    images = torch.randint(0, 255, (batch, m, h, w, 3), dtype=torch.uint8)
    mask = torch.ones(batch, m, dtype=torch.bool)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    x, mask = prepare(images, mask, device, train=True)
    with autocast(device, dtype):
        out = model(x, mask)
        loss = out["binary_logits"].float().mean() + out["subtype_logits"].float().mean()
    (scaler.scale(loss) if scaler else loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def fits(cfg, model, optimizer, batch, device):
    try:
        step_memory(cfg, model, optimizer, batch, device)
        return True
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False


def cuda_index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


def largest_batch(cfg, model, optimizer, device, budget_gb=24, limit=4096):
    """Largest batch whose training step fits when the process may use at most `budget_gb` GB."""
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GB / total), index)
    try:
        ok, batch = 0, cfg.batch_size
        while batch <= limit and fits(cfg, model, optimizer, batch, device):
            ok, batch = batch, batch * 2
        bad = batch if batch <= limit else None
        while bad is not None and bad - ok > 1:
            mid = (ok + bad) // 2
            ok, bad = (mid, bad) if fits(cfg, model, optimizer, mid, device) else (ok, mid)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    return ok


def cuda_memory(cfg, run, device):
    """(peak GB of one training step at the configured batch, largest batch in 24 GB)."""
    from backbones import build_model
    from stages.training.train import build_optimizer
    model = build_model(run.model_name, **run.model_kwargs).to(device).train()
    optimizer = build_optimizer(model, cfg, device)
    step_memory(cfg, model, optimizer, cfg.batch_size, device)
    peak = step_memory(cfg, model, optimizer, cfg.batch_size, device)
    return peak / GB, largest_batch(cfg, model, optimizer, device)


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(cuda_index(device))
    return f"cpu x{torch.get_num_threads()} threads"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="synthetic tree: demo (CPU default) or full (CUDA default)")
    parser.add_argument("--root", default=None, help="an existing data tree instead of a fresh synthetic one")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward (CUDA only)")
    parser.add_argument("--csv", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    preset = args.preset or ("full" if device.type == "cuda" else "demo")
    cfg = replace(settings(device), compile=args.compile)
    seed_everything(cfg.seed)
    rows = []

    def add(metric, value, unit, note=""):
        rows.append(dict(metric=metric, value=round(value, 3), unit=unit, note=note))

    with tempfile.TemporaryDirectory() as work:
        from preprocess.analyze import load_index
        from stages.training.data import index_bank, prepare_run
        from stages.training.runs import REFERENCE
        cfg, made = prepare_tree(cfg, args.root, preset, work)
        paths = load_index(cfg)["path"].astype(str).tolist()
        reset_peak(device)
        _, decode_s = timed(lambda: index_bank(cfg, load_index(cfg)))
        run = prepare_run(cfg, "bench", "fold_0", REFERENCE, {})
        _, place_s = timed(lambda: run.bank.on(device), device)
        where = run.bank.on(device).device
        setting = f"{preset} tree, {cfg.backbone} @ {cfg.image_size}px, batch {cfg.batch_size}"
        if args.root is None:
            add("synthetic tree written", made, "s", f"{len(paths)} images ({preset})")
        add("cache build (decode + resize)", len(paths) / decode_s, "images/s", f"{len(paths)} PNGs, threads")
        add("image bank placed", place_s, "s", f"{run.bank.host.nbytes / GB:.2f} GB on {where}")
        gather_rate, augment_rate = gather_rates(run, device)
        add("ImageBank gather", gather_rate, "images/s", f"uint8 rows -> {device}")
        add("gather + prepare (augment)", augment_rate, "images/s", f"kornia + HED on {device}")
        train_rate, eval_rate, epoch_s = engine_rates(cfg, run, device)
        add("training", train_rate, "tuples/s", setting + (", compiled" if cfg.compile else ""))
        add("evaluation", eval_rate, "tuples/s", setting)
        add("epoch (train + validation)", epoch_s, "s", f"{len(run.train_sampler.group_list)} groups x "
            f"{cfg.tuples_per_patient} tuples")
        add("peak process memory (RSS)", peak_rss_gb(), "GB", "cache, bank, model, training")
        if device.type == "cuda":
            eval_s = sum(len(run.tuples[r]) for r in ("train", "val", "test")) / eval_rate
            add("projected 5-fold CV (MMNet)", 5 * (cfg.epochs * epoch_s + eval_s) / 60, "min",
                f"{cfg.epochs} epochs per fold, no early stop, + cache build once")
            peak, biggest = cuda_memory(cfg, run, device)
            add("peak GPU memory, one training step", peak, "GB", f"batch {cfg.batch_size}, AMP")
            add("largest batch in 24 GB", biggest, "tuples", f"{len(cfg.magnifications)} images each")
    table = pd.DataFrame(rows)
    print(f"device: {describe_device(device)}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(table.to_string(index=False))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
