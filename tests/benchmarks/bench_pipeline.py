"""Pipeline throughput per stage on whatever device is there: wall time, tuples/s, the in-memory limit of the same model
and the ratio to it, evaluation time as a fraction of training time, peak memory.

python tests/benchmarks/bench_pipeline.py [--epochs N] [--batch-size B] [--image-size S] [--device D] [--threads N]
    [--preset tiny|demo|full] [--root DIR] [--work DIR] [--compile] [--profile] [--full [-- main.py flags]]
Default: fold 0 of the cv stage (fit + evaluate) on the demo tree at demo settings on CPU, on the full tree at the
defaults on CUDA. The in-memory limit repeats forward + backward + optimizer step (training) or the forward alone
(evaluation) of the same model on one batch already on the device: no data loading, no augmentation.
--full also runs `main.py` (every stage) on the full-size synthetic tree in a subprocess and prints each stage's wall
time and the total; flags after `--` go to main.py. The last line reads
`pipeline: train T tuples/s, limit L tuples/s, train/limit R, eval/train E` so runs can be compared; the line before
it times a single-magnification baseline's training the same way (`single-magnification: ...`): it decodes, augments
and forwards only the one image per tuple it reads.
"""
import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench_train import peak_gpu_gb, peak_rss_gb, place, reset_peak, settings, sync, timed  # noqa: E402
from config import demo_overrides  # noqa: E402
from utils.env import resolve_device, seed_everything  # noqa: E402
from utils.helpers import PipelineError, setup_logging  # noqa: E402

SPLIT = "fold_0"
EPOCHS = 4


class Stages:
    """One row per stage: wall seconds, work done, rate, in-memory limit and ratio, peak memory."""

    def __init__(self, device):
        self.device, self.rows = device, []

    @contextmanager
    def stage(self, name, n=None, unit="tuples"):
        """Time the block and record its peak memory; `n` items done (or done["n"] set inside) give the rate."""
        done = dict(n=n)
        reset_peak(self.device)
        start = time.perf_counter()
        yield done
        sync(self.device)
        self.add(name, time.perf_counter() - start, done["n"], unit, rss=peak_rss_gb(), gpu=peak_gpu_gb(self.device))

    def add(self, name, seconds, n=None, unit="tuples", limit=None, rss=float("nan"), gpu=float("nan")):
        rate = n / seconds if n and seconds > 0 else float("nan")
        self.rows.append(dict(stage=name, wall_s=seconds, rate=rate, unit=f"{unit}/s" if n else "",
                              limit=limit or float("nan"), ratio=rate / limit if limit else float("nan"),
                              peak_rss_gb=rss, peak_gpu_gb=gpu))

    def table(self):
        table = pd.DataFrame(self.rows)
        if self.device.type != "cuda":
            table = table.drop(columns="peak_gpu_gb")
        return table.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.3f}")


class Clock:
    """Wall seconds of every call to chosen module functions, patched for the duration of a `with` block."""

    def __init__(self, device):
        self.device, self.calls = device, defaultdict(list)

    @contextmanager
    def watch(self, module, name, label):
        original = getattr(module, name)

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                self.calls[label].append(time.perf_counter() - start)

        setattr(module, name, timed_call)
        try:
            yield
        finally:
            setattr(module, name, original)

    def total(self, label):
        return sum(self.calls[label])


def watching(clock, targets):
    stack = ExitStack()
    for module, name, label in targets:
        stack.enter_context(clock.watch(module, name, label))
    return stack


def best_rate(step, per_step, device, steps, blocks=4, warmup=3):
    """Items/s of the fastest of `blocks` blocks of repeated steps, after warm-up (a limit: noise only slows it)."""
    for _ in range(warmup):
        step()
    size = max(1, steps // blocks)
    times = [timed(lambda: [step() for _ in range(size)], device)[1] for _ in range(blocks)]
    return per_step * size / min(times)


def train_limit(cfg, run, device, steps):
    """Tuples/s of forward + backward + optimizer step of a fresh model on one plain batch already on the device."""
    from backbones import build_model
    from preprocess.transforms import prepare
    from stages.training.forward import autocast, targets
    from stages.training.train import optimisation
    model = build_model(run.model_name, **run.model_kwargs)
    forward = place(model, cfg, device)
    opt = optimisation(model, cfg, device, steps + 3)
    rows, labels, subtypes = next(iter(run.train_sampler))
    x, mask = prepare(*run.bank.gather(rows, device), device, train=True)
    y, s = targets(labels, device), targets(subtypes, device, torch.long)
    model.train()

    def step():
        with autocast(device, opt.dtype):
            loss = run.criterion(forward(x, mask), y, s)
        (opt.scaler.scale(loss) if opt.scaler else loss).backward()
        opt.step(model, cfg)

    return best_rate(step, len(labels), device, steps)


@torch.no_grad()
def eval_limit(cfg, model, run, device, steps):
    """Tuples/s of the eval-mode forward of `model` on one batch already on the device."""
    from preprocess.transforms import prepare
    from stages.training.forward import amp_settings, autocast
    dtype, _ = amp_settings(cfg, device)
    rows, _, _ = run.batches["test"][0]
    x, mask = prepare(*run.bank.gather(rows, device), device)
    model.eval()

    def forward():
        with autocast(device, dtype):
            model(x, mask)

    return best_rate(forward, len(rows), device, steps)


def steady(seconds):
    """Median epoch time without the first epoch (warm-up, cudnn autotune, compile) when there are more."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def evaluated_tuples(cfg, run):
    roles = ("train", "val", "test") if cfg.smote else ("val", "test")
    return sum(len(run.tuples[r]) for r in roles)


def prepare_fold(cfg, device, stages):
    """Index, split and cache stages, then the run of fold 0 with its bank on the device."""
    from preprocess.analyze import load_index, run_analyze
    from stages.training.data import index_bank
    from preprocess.preprocess import run_split
    from stages.training.data import prepare_run
    from stages.training.runs import REFERENCE
    with stages.stage("analyze"):
        run_analyze(cfg)
    with stages.stage("split"):
        run_split(cfg)
    index = load_index(cfg)
    with stages.stage("cache (decode + resize)", len(index), "images"):
        index_bank(cfg, index)
    with stages.stage("prepare_run + bank"):
        run = prepare_run(cfg, REFERENCE, SPLIT, REFERENCE, {})
        run.bank.on(device)
    return run


def epoch_tuples(run):
    return sum(len(labels) for _, labels, _ in run.train_sampler)


def fit_and_evaluate(cfg, run, device, stages, clock, profile):
    """fit() then evaluate() of fold 0 with the engine's inner calls clocked: (fit seconds, evaluate seconds)."""
    import stages.training.evaluate as evaluate_module
    import stages.training.train as train_module
    from backbones import build_model
    seed_everything(cfg.seed)
    model = build_model(run.model_name, **run.model_kwargs)
    watched = [(train_module, "train_epoch", "train"), (train_module, "predict", "validation"),
               (evaluate_module, "predict", "predict"), (evaluate_module, "smote_head", "smote")]
    profiler = cProfile.Profile() if profile else nullcontext()
    with watching(clock, watched):
        with stages.stage("fit") as done:
            state, fit_s = timed(lambda: train_module.fit(cfg, model, run, device), device)
            done["n"] = epoch_tuples(run) * len(state.history)
        with stages.stage("evaluate", evaluated_tuples(cfg, run)), profiler:
            own = {role: sorted(run.tuples[role]["patient_id"].astype(str).unique()) for role in ("train", "val")}
            sources = [dict(name=run.tag, **own)]
            _, eval_s = timed(lambda: evaluate_module.evaluate(cfg, model, run, device, state, sources), device)
    if profile:
        print_profile(profiler)
    return model, fit_s, eval_s


def fold_zero(cfg, args, device, stages, run=None):
    """Fold 0 of the cv stage timed per stage and inside fit and evaluate (a given `run` skips index, split, cache)."""
    run = run or prepare_fold(cfg, device, stages)
    per_epoch = epoch_tuples(run)
    limit = train_limit(cfg, run, device, args.steps)
    clock = Clock(device)
    model, fit_s, eval_s = fit_and_evaluate(cfg, run, device, stages, clock, args.profile)
    infer = eval_limit(cfg, model, run, device, args.steps)
    epochs, train_s, val_s = len(clock.calls["train"]), clock.total("train"), clock.total("validation")
    predict_s, smote_s = clock.total("predict"), clock.total("smote")
    stages.add("  fit: train epochs", train_s, per_epoch * epochs, limit=limit)
    stages.add("  fit: validation", val_s, len(run.tuples["val"]) * epochs, limit=infer)
    stages.add("  fit: checkpoints, rest", fit_s - train_s - val_s)
    stages.add("  evaluate: predict", predict_s, evaluated_tuples(cfg, run), limit=infer)
    stages.add("  evaluate: SMOTE head", smote_s)
    stages.add("  evaluate: metrics, rest", eval_s - predict_s - smote_s)
    return dict(train=per_epoch / steady(clock.calls["train"]), limit=limit, eval_train=eval_s / fit_s,
                epochs=epochs, per_epoch=per_epoch)


def single_rate(cfg, device):
    """Training tuples/s of single_<first magnification> over two epochs of fold 0, steady epoch as for MMNet."""
    import stages.training.train as train_module
    from backbones import build_model
    mag = cfg.magnifications[0]
    run = prepare_run_of(cfg, f"single_{mag}", "single_mag", {"magnifications": (mag,)})
    model = build_model(run.model_name, **run.model_kwargs)
    seconds = []
    original = train_module.train_epoch

    def clocked(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync(device)
        seconds.append(time.perf_counter() - start)
        return out

    train_module.train_epoch = clocked
    try:
        train_module.fit(replace(cfg, epochs=2, warmup_epochs=1), model, run, device)
    finally:
        train_module.train_epoch = original
    return f"single_{mag}", epoch_tuples(run) / steady(seconds)


def prepare_run_of(cfg, name, model, flags):
    from stages.training.data import prepare_run
    return prepare_run(cfg, name, SPLIT, model, flags)


def print_profile(profiler, top=20):
    print(f"\nevaluate() profile, top {top} by cumulative time:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(top)


def main_flags(args, device):
    """main.py flags for --full: the synthetic tree, random init, and the settings given here."""
    flags = ["--synthetic", "--no-pretrained"]
    chosen = dict(epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                  device=args.device if args.device != "auto" else None)
    if device.type != "cuda":
        chosen = dict(demo_overrides(), **{k: v for k, v in chosen.items() if v is not None})
    for key, value in chosen.items():
        if value is None or isinstance(value, bool):
            continue
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def end_to_end(root, out, flags, threads=None):
    """Run main.py (every stage) in a subprocess; returns its stage_times.csv."""
    command = [sys.executable, str(REPO / "main.py"), "--data-root", str(root), "--output-dir", str(out), *flags]
    log = Path(out).parent / "main_console.log"
    print(f"\n$ {' '.join(command)}\n(console -> {log})", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(log, "w") as console:
        code = subprocess.call(command, cwd=REPO, stdout=console, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise PipelineError(f"main.py exited with code {code}; last lines of {log}:\n{tail}")
    return pd.read_csv(Path(out) / "logs" / "stage_times.csv")


def print_stage_times(times):
    print("\nend to end (main.py), stage wall time:")
    for stage, seconds in zip(times["stage"], times["seconds"]):
        print(f"  {stage:<10} {seconds:9.1f} s")
    print(f"  {'total':<10} {times['seconds'].sum():9.1f} s")


def header(cfg, args, device, preset):
    from stages.training.forward import amp_settings
    dtype, _ = amp_settings(cfg, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"settings: {preset} tree, {SPLIT}, {cfg.backbone} @ {cfg.image_size}px, batch {cfg.batch_size}, "
          f"{cfg.epochs} epochs x {cfg.tuples_per_patient} tuples/patient, AMP {dtype or 'off (fp32)'}, "
          f"compile {cfg.compile and device.type == 'cuda'}, SMOTE {cfg.smote}, TTA {cfg.tta}, "
          f"limit over {args.steps} steps")


def config_for(args, device, work):
    cfg = replace(settings(device), output_dir=str(Path(work) / "output"), compile=args.compile)
    chosen = dict(batch_size=args.batch_size, image_size=args.image_size)
    return replace(cfg, epochs=args.epochs or EPOCHS, **{k: v for k, v in chosen.items() if v is not None})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default {EPOCHS} (the demo's); main.py keeps its own under --full unless given")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--preset", default=None, help="synthetic tree: tiny, demo (CPU default), full (CUDA default)")
    parser.add_argument("--root", default=None, help="an existing data tree instead of a generated one")
    parser.add_argument("--work", default=None, help="folder for the tree and outputs (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=20, help="repeated steps of each in-memory limit")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward (CUDA only)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of evaluate()")
    parser.add_argument("--verbose", action="store_true", help="show the pipeline's own log lines")
    parser.add_argument("--full", action="store_true", help="also run main.py end to end on the full synthetic tree")
    args, rest = parser.parse_known_args(argv)
    if rest and (not args.full or rest[0] != "--"):
        parser.error(f"unrecognised arguments {' '.join(rest)} (main.py flags go after --full --)")
    args.main_flags = rest[1:]
    return args


def generate(root, preset, stages):
    from preprocess.synthetic import make_synthetic
    with stages.stage(f"generate {preset} tree"):
        make_synthetic(root, preset=preset, seed=0)


def run(args, work):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    preset = "full" if args.full else args.preset or ("full" if device.type == "cuda" else "demo")
    cfg = config_for(args, device, work)
    setup_logging(Path(work) / "bench_pipeline.log", console=args.verbose)
    header(cfg, args, device, preset)
    stages = Stages(device)
    root = Path(args.root) if args.root else Path(work) / f"data_{preset}"
    if not args.root and not root.exists():
        generate(root, preset, stages)
    cfg = replace(cfg, data_root=str(root))
    seed_everything(cfg.seed)
    result = fold_zero(cfg, args, device, stages)
    print(f"\nper stage ({result['epochs']} epochs x {result['per_epoch']} training tuples; "
          f"load average {os.getloadavg()[0]:.1f}):")
    print(stages.table())
    if args.full:
        flags = main_flags(args, device) + args.main_flags
        print_stage_times(end_to_end(root, Path(work) / "main_output", flags, args.threads))
    name, single = single_rate(cfg, device)
    print(f"single-magnification: {name} train {single:.2f} tuples/s, MMNet {result['train']:.2f} tuples/s, "
          f"ratio {single / result['train']:.2f} x")
    ratio = result["train"] / result["limit"]
    print(f"pipeline: train {result['train']:.2f} tuples/s, limit {result['limit']:.2f} tuples/s, "
          f"train/limit {ratio:.2f}, eval/train {result['eval_train']:.2f}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.work:
            Path(args.work).mkdir(parents=True, exist_ok=True)
            return run(args, args.work)
        with tempfile.TemporaryDirectory() as work:
            return run(args, work)
    except PipelineError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
