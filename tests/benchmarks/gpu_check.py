"""One GPU acceptance check: the CUDA paths of the pipeline once, timed, in at most 8 minutes on one H100/H200.

python tests/benchmarks/gpu_check.py [--work DIR] [--dry] [--deadline S]
Parts (PARTS, in order), each in its own try so a failing one prints its name and error and the others still run:
tree (the full-size synthetic tree), prepare (index, splits, image cache), cv (fold 0 at the defaults, eager), bench
(bench_pipeline's figures on fold 0), predict (ms per patient, PNG files to decision), torchrun (--nproc-per-node 1,
nccl, one stage), jobs (--jobs 0 on a short stage), compile (fold 0 with --compile), memory (peak GPU memory in use
during each part), estimate (the default run's --plan: its unit list and its wall time from the same short measurement;
docs/benchmarks.md, "GPU acceptance check"). The main.py parts run in subprocesses that must end by --deadline seconds
after the start; their timeouts (TIMEOUT_S) sum to less than it. The pretrained path runs through a local weights file
(--weights, default: the default backbone's own weights saved by timm into WORK/weights.pth), as the box is offline.
--dry: the same code on the tiny tree on CPU with tiny settings (gloo instead of nccl, no compile speedup expected,
main() in this process except under torchrun), run by tests/test_gpu_check.py. The last line reads
`gpu: pipeline ~T min (est.), cv fold W s, compile C x, train/limit R, eval/train E, predict P ms/patient, jobs J`.
"""
import argparse
import gc
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

import bench_pipeline  # noqa: E402
from bench_predict import one_patient, patients  # noqa: E402
import main as pipeline  # noqa: E402
from preprocess.analyze import load_index, run_analyze  # noqa: E402
from preprocess.preprocess import run_split  # noqa: E402
from preprocess.synthetic import make_synthetic  # noqa: E402
from stages.planning.plan import estimate as plan_estimate, plan_line, plan_units  # noqa: E402
from stages.training.data import index_bank, prepare_run  # noqa: E402
from stages.training.forward import amp_settings  # noqa: E402
from stages.inference.predictor import load_predictor  # noqa: E402
from stages.training.runs import REFERENCE  # noqa: E402
from utils.helpers import RunFiles, read_json, setup_logging  # noqa: E402

PARTS = ("tree", "prepare", "cv", "bench", "predict", "torchrun", "jobs", "compile", "memory", "estimate")
GIB = 2**30
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1")
DRY = ("--device", "cpu", "--backbone", "test_efficientnet", "--image-size", "32", "--subtype-min-images", "10",
       "--epochs", "1", "--batch-size", "8", "--tuples-per-patient", "4", "--warmup-epochs", "1", "--bootstrap", "20",
       "--no-amp", "--lr", "2e-3", "--resnet-backbone", "test_resnet")
DRY_BASELINES = ("--runs", "simple_concat,single_40X")
TIMEOUT_S = dict(cv=150, compile=120, jobs=90, torchrun=60)


class Memory:
    """Peak GPU memory in use on the whole device (total - free, every process) while each part runs."""

    def __init__(self, device):
        self.device, self.peaks = device, {}

    @contextmanager
    def watch(self, name):
        if self.device.type != "cuda":
            yield
            return
        stop = threading.Event()
        thread = threading.Thread(target=self.poll, args=(name, stop), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def poll(self, name, stop):
        while True:
            free, total = torch.cuda.mem_get_info(self.device)
            self.peaks[name] = max(self.peaks.get(name, 0.0), (total - free) / GIB)
            if stop.wait(0.2):
                return


class Check:
    """Where the check writes, its settings, and what each part found (None for a part that failed)."""

    def __init__(self, work, dry, deadline_s, weights=""):
        self.work, self.dry, self.weights = Path(work), dry, weights
        self.root, self.out = self.work / "data", self.work / "output"
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        self.memory = Memory(self.device)
        self.results, self.start, self.deadline_s = {}, time.time(), deadline_s

    def flags(self, *extra):
        weights = ["--no-pretrained"] if self.dry else ["--pretrained-path", self.weights]
        base = ["--data-root", str(self.root), "--output-dir", str(self.out), "--synthetic", *weights]
        return [*base, *(DRY if self.dry else ()), *extra]

    def config(self, *extra):
        return pipeline.resolve_config(self.flags(*extra))

    def need(self, name):
        if self.results.get(name) is None:
            raise RuntimeError(f"needs the {name} part, which failed")
        return self.results[name]

    def timeout(self, name):
        left = self.deadline_s - (time.time() - self.start)
        if left < 5:
            raise TimeoutError(f"no time left before the {self.deadline_s:.0f} s deadline")
        return min(TIMEOUT_S[name], left)


def shown(result):
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())


def free_gpu():
    """Hand this process's cached GPU memory back before the next part (--jobs 0 counts free memory)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part(check, name, fn):
    """Run one part; a failure prints the part's name and the error, and the check goes on."""
    start = time.time()
    try:
        with check.memory.watch(name):
            result = fn(check)
    except Exception as e:  # noqa: BLE001 - whatever one part does, the others still run
        check.results[name] = None
        print(f"[{name}] FAILED after {time.time() - start:.0f} s: {type(e).__name__}: {e}", flush=True)
        return None
    finally:
        free_gpu()
    check.results[name] = result
    print(f"[{name}] ok in {time.time() - start:.0f} s: {shown(result)}", flush=True)
    return result


def main_py(check, name, args, launcher=()):
    """main.py in its own process group (killed whole at the timeout); its console goes to WORK/<name>.log."""
    if check.dry and not launcher:
        return main_here(check, name, args)
    command = [sys.executable, *launcher, "main.py", *args]
    limit = check.timeout(name)
    env = dict(os.environ, OMP_NUM_THREADS="1") if check.dry else None
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    try:
        text = proc.communicate(timeout=limit)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text = proc.communicate()[0]
        (check.work / f"{name}.log").write_text(text)
        raise TimeoutError(f"main.py ran past {limit:.0f} s; its console is in {check.work / name}.log") from None
    (check.work / f"{name}.log").write_text(text)
    if proc.returncode != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise RuntimeError(f"main.py exited with code {proc.returncode}: {tail}")
    return text


def main_here(check, name, args):
    """--dry: main.py's main() in this process (no start-up cost), its console captured alike."""
    console = io.StringIO()
    with redirect_stdout(console):
        code = pipeline.main(args)
    setup_logging(check.work / "gpu_check.log", console=False)
    (check.work / f"{name}.log").write_text(console.getvalue())
    if code != 0:
        raise RuntimeError(f"main.py exited with code {code}: {' | '.join(console.getvalue().splitlines()[-3:])}")
    return console.getvalue()


def stage_seconds(check, stage):
    times = pd.read_csv(check.out / "logs" / "stage_times.csv")
    return float(times.set_index("stage")["seconds"][stage])


def steady_epoch_s(check):
    seconds = pd.read_csv(RunFiles(check.out / "runs" / REFERENCE / "fold_0").history)["seconds"].tolist()
    return bench_pipeline.steady(seconds)


def tree(check):
    preset = "tiny" if check.dry else "full"
    if not check.root.exists():
        make_synthetic(check.root, preset=preset, seed=0, difficulty="easy" if check.dry else None)
    return dict(preset=preset, images=sum(1 for _ in check.root.rglob("*.png")))


def local_weights(check):
    """The default backbone's weights as a local file (--weights, else timm's random init saved to WORK): the
    pretrained path without a network."""
    if check.dry or check.weights:
        return
    import timm
    check.weights = str(check.work / "weights.pth")
    torch.save(timm.create_model(pipeline.Config().backbone).state_dict(), check.weights)


def prepare(check):
    local_weights(check)
    start, cfg = time.time(), check.config()
    run_analyze(cfg)
    run_split(cfg)
    bank = index_bank(cfg, load_index(cfg))
    return dict(images=len(bank.host), field=f"{bank.shape[1]}x{bank.shape[0]}", seconds=time.time() - start)


def cv(check):
    check.need("prepare")
    main_py(check, "cv", check.flags("--stages", "cv", "--folds", "0", "--force"))
    m = read_json(RunFiles(check.out / "runs" / REFERENCE / "fold_0").metrics)
    return dict(fold_s=stage_seconds(check, "cv"), epochs=m["epochs"], epoch_s=steady_epoch_s(check),
                test_auc=m["test"]["patient"]["youden"]["auc"])


def bench(check):
    check.need("prepare")
    args = bench_pipeline.parse_args(["--steps", "4" if check.dry else "20"])
    cfg = replace(check.config(), epochs=1 if check.dry else bench_pipeline.EPOCHS, folds=(0,))
    run = prepare_run(cfg, "gpu_check_bench", "fold_0", REFERENCE, {})
    run.bank.on(check.device)
    stages = bench_pipeline.Stages(check.device)
    result = bench_pipeline.fold_zero(cfg, args, check.device, stages, run)
    print(stages.table(), flush=True)
    peak = torch.cuda.max_memory_allocated(check.device) / GIB if check.device.type == "cuda" else float("nan")
    eval_s = next(row["wall_s"] for row in stages.rows if row["stage"] == "evaluate")
    return dict(train=result["train"], limit=result["limit"], train_limit=result["train"] / result["limit"],
                eval_train=result["eval_train"], eval_s=eval_s, allocated_gib=peak)


def predict(check):
    check.need("cv")
    cfg = check.config()
    p = load_predictor([check.out / "models" / "checkpoints" / f"{REFERENCE}_fold_0.pth"], check.device)
    dtype, _ = amp_settings(cfg, check.device)
    groups = list(patients(check.root, 0, 0, min_images=8).values())[: 3 if check.dry else 5]
    one_patient(p, groups[0], check.device, dtype, cfg.batch_size)
    times = [one_patient(p, files, check.device, dtype, cfg.batch_size)[0] for files in groups]
    return dict(ms_per_patient=1000 * statistics.median(sum(t.values()) for t in times),
                model_ms=1000 * statistics.median(t["model"] for t in times), patients=len(groups))


def compiled(check):
    eager = check.need("cv")
    backend = ("--compile-backend", "eager") if check.dry else ()
    main_py(check, "compile", check.flags("--stages", "cv", "--folds", "0", "--compile", *backend, "--force"))
    fold_s = stage_seconds(check, "cv")
    return dict(fold_s=fold_s, speedup=eager["fold_s"] / fold_s, epoch_speedup=eager["epoch_s"] / steady_epoch_s(check))


def jobs(check):
    check.need("prepare")
    text = main_py(check, "jobs", check.flags("--stages", "baselines", "--folds", "0", "--epochs", "1", "--jobs", "0",
                                              "--force", *(DRY_BASELINES if check.dry else ())))
    picked = re.search(r"--jobs 0: (\d+) process", text)
    if picked is None:
        raise RuntimeError("main.py did not say how many processes --jobs 0 picked")
    runs = {p.parent.parent.name: read_json(p)["train_seconds"] for p in check.out.glob("runs/*/fold_0/metrics.json")}
    return dict(jobs=int(picked.group(1)), stage_s=stage_seconds(check, "baselines"),
                runs={k: round(v, 1) for k, v in sorted(runs.items()) if k not in (REFERENCE, "gpu_check_bench")})


def torchrun(check):
    check.need("prepare")
    text = main_py(check, "torchrun", check.flags("--stages", "cv", "--folds", "1", "--epochs", "1", "--force"),
                   TORCHRUN)
    backend = re.search(r"torch\.distributed: (\w+) backend", text)
    want = "nccl" if check.device.type == "cuda" else "gloo"
    if backend is None or backend.group(1) != want:
        raise RuntimeError(f"expected a {want} process group, main.py said {backend.group(0) if backend else 'none'}")
    return dict(backend=backend.group(1), stage_s=stage_seconds(check, "cv"))


def memory(check):
    if check.device.type != "cuda":
        return dict(peak="n/a (no GPU)")
    peaks = {k: round(v, 1) for k, v in check.memory.peaks.items()}
    return dict(peak_gib=max(peaks.values()), per_part=peaks, total_gib=torch.cuda.mem_get_info()[1] / GIB)


def default_units(check):
    """The units of the default `python main.py` at this check's settings (what --plan lists), every one to train."""
    cfg = replace(check.config(), force=True)
    return cfg, plan_units(cfg, list(pipeline.DEFAULT))


def estimate(check):
    """The default run's plan on this device: the same unit list and short measurement as --plan."""
    prepare_s = check.need("prepare")["seconds"]
    cfg, units = default_units(check)
    est = plan_estimate(cfg, list(pipeline.DEFAULT), units, dict(analyze=prepare_s))
    print(plan_line(units, est), flush=True)
    return dict(minutes=sum(est.stages.values()) / 60, units=len(units), disk_gb=est.disk)


def number(check, name, key, fmt):
    result = check.results.get(name)
    return format(result[key], fmt) if result and isinstance(result.get(key), (int, float)) else "n/a"


def last_line(check):
    get = lambda name, key, fmt=".2f": number(check, name, key, fmt)  # noqa: E731
    return (f"gpu: pipeline ~{get('estimate', 'minutes', '.1f')} min (est.), cv fold {get('cv', 'fold_s', '.0f')} s, "
            f"compile {get('compile', 'speedup')} x, train/limit {get('bench', 'train_limit')}, "
            f"eval/train {get('bench', 'eval_train')}, predict {get('predict', 'ms_per_patient', '.0f')} ms/patient, "
            f"jobs {get('jobs', 'jobs', 'd')}")


def header(check):
    name = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "cpu"
    print(f"gpu_check{' --dry' if check.dry else ''}: {check.device} ({name}); torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs; work {check.work}; deadline {check.deadline_s:.0f} s", flush=True)


def run(check):
    if check.dry:
        torch.set_num_threads(1)
    header(check)
    setup_logging(check.work / "gpu_check.log", console=False)
    steps = dict(tree=tree, prepare=prepare, cv=cv, bench=bench, predict=predict, compile=compiled, jobs=jobs,
                 torchrun=torchrun, memory=memory, estimate=estimate)
    for name in PARTS:
        part(check, name, steps[name])
    print(f"check took {time.time() - check.start:.0f} s", flush=True)
    print(last_line(check), flush=True)
    return 0 if all(check.results.get(name) is not None for name in PARTS) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="", help="folder for the tree and outputs (default: a temporary one); "
                        "a tree already there is reused")
    parser.add_argument("--dry", action="store_true", help="the tiny tree on CPU with tiny settings (the test suite)")
    parser.add_argument("--deadline", type=float, default=480, help="seconds after the start by which the subprocess "
                        "parts must end (default 480)")
    parser.add_argument("--weights", default="", help="weights file of the default backbone for --pretrained-path "
                        "(default: timm's initial weights of it, saved under --work)")
    args = parser.parse_args(argv)
    if sum(TIMEOUT_S.values()) >= args.deadline:
        parser.error(f"--deadline {args.deadline:.0f} s leaves no time: the parts' timeouts sum to "
                     f"{sum(TIMEOUT_S.values())} s")
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return run(Check(args.work, args.dry, args.deadline, args.weights))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        return run(Check(work, args.dry, args.deadline, args.weights))


if __name__ == "__main__":
    sys.exit(main())
