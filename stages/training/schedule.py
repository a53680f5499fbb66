"""Where runs go: a stage's fixed list of (run, split) units, shared over torchrun ranks and --jobs processes; a unit
another process holds is skipped and taken up once the free ones are done."""
import atexit
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from backbones import REFERENCE_MODEL
from preprocess.analyze import load_index, subtype_classes
from preprocess.cache import field_shape
from stages.training.measure import measure_shape
from stages.training.run import fold_line, holder, run_one, trained_by
from stages.training.runs import RunSpec
from utils.env import resolve_device
from utils.helpers import PipelineError, RunFiles, index_path, log, run_dir, setup_logging

GIB = 2**30
GIB_PER_RUN = 12
WAIT_S = 2.0


def launched_by_torchrun():
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed():
    """Join the torchrun process group (nccl on GPU, gloo on CPU); under torchrun even a single rank joins one."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() == 0:
        log(f"torch.distributed: {dist.get_backend()} backend, {dist.get_world_size()} rank(s)")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_ok(ok):
    """True when this stage went well on every rank; the one collective per stage, so it doubles as the barrier."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([int(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def run_bytes(cfg, device):
    """GPU bytes one run needs: the peak of a training step of the reference model at the command's batch and field,
    measured here, plus the image bank each process keeps on the GPU; GIB_PER_RUN before the index exists."""
    if not index_path(cfg).exists():
        return GIB_PER_RUN * GIB
    index = load_index(cfg)
    field = field_shape(index["width"], index["height"], cfg.image_size)
    spec = RunSpec(REFERENCE_MODEL, REFERENCE_MODEL, "cv")
    peak = measure_shape(cfg, spec, len(subtype_classes(index)), field, device).peak_bytes
    torch.cuda.empty_cache()
    return peak + len(index) * field[0] * field[1] * 3


def job_count(cfg):
    """--jobs, or with --jobs 0 as many processes as free GPU memory holds runs of the measured size, with a quarter
    to spare (at most 4; 1 on CPU)."""
    if cfg.jobs > 0:
        return cfg.jobs
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        log("--jobs 0: 1 process (no GPU)")
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    need = run_bytes(cfg, device)
    jobs = int(max(1, min(4, free // (need * 1.25))))
    log(f"--jobs 0: {jobs} process(es) for {free / GIB:.0f} GiB of free GPU memory, {need / GIB:.1f} GiB per run "
        f"(measured: a training step at batch {cfg.batch_size} and the image bank)")
    return jobs


def run_units(cfg, units):
    """Run this rank's share (units r, r+N, ...) of a stage's units, in --jobs processes when asked."""
    mine = units[rank()::world_size()]
    jobs = min(job_count(cfg), len(mine))
    if jobs <= 1:
        come_back(cfg, [unit for unit in mine if skipped(cfg, unit, run_one(cfg, *unit, wait=False))])
        return
    run_parallel(cfg, mine, jobs)


def tag(unit):
    return f"{unit[0].name}/{unit[1]}"


def skipped(cfg, unit, result):
    """True (and said) when another process held the unit: this one moves on to the next free unit."""
    if result is not None:
        return False
    log(f"[{tag(unit)}] is being trained by {holder(cfg, *unit)}; taking the next free run, back to it at the end")
    return True


def later(cfg):
    """Settings for a unit taken up again: a result another process finished meanwhile is read, even under --force."""
    return replace(cfg, force=False)


def come_back(cfg, busy):
    """Units other processes held: each read once its holder finished it, or trained here when its lock goes stale."""
    if busy:
        log(f"every free run is done; back to {len(busy)} held by other processes: {', '.join(map(tag, busy))}")
    while busy:
        time.sleep(WAIT_S)
        busy = [unit for unit in busy if run_one(later(cfg), *unit, wait=False) is None]


def exit_with(parent):
    """A worker whose parent died (killed, interrupted) stops too instead of training on unseen."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


_POOLS = {}


def process_pool(jobs):
    """(`jobs` spawned processes, CPU threads for each): the one pool of runs and of tuning workers, started once per
    command and kept for its later stages (a worker's imports and image bank are paid once); a broken one is
    replaced."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = _POOLS.get(jobs)
    if pool is None or getattr(pool, "_broken", False):
        close_pools()
        pool = _POOLS[jobs] = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    return pool, threads


def close_pools():
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


atexit.register(close_pools)


def start_worker(parent, threads, log_file):
    """A pool process's first steps: stop when the parent dies, take its share of threads, log to its own file."""
    exit_with(parent)
    torch.set_num_threads(threads)
    setup_logging(log_file, console=False)


def worker(cfg, spec, split, threads, parent, wait):
    """One run in a fresh process: its log goes to the run folder, the parent prints one line when it ends."""
    start_worker(parent, threads, RunFiles(run_dir(cfg, spec.name, split)).log)
    return run_one(cfg, spec, split, wait=wait)


def run_parallel(cfg, units, jobs):
    """First pass without waiting; the units other processes held go round again, each worker waiting for one."""
    log(f"{len(units)} runs in {jobs} processes; each run logs to its folder's run.log")
    failed = []
    bar = tqdm(total=len(units), desc="runs", disable=None, dynamic_ncols=True)
    pool, threads = process_pool(jobs)
    busy = run_pass(pool, cfg, units, threads, failed, bar, wait=False)
    if busy:
        log(f"every free run is done; back to {len(busy)} held by other processes: {', '.join(map(tag, busy))}")
        run_pass(pool, later(cfg), busy, threads, failed, bar, wait=True)
    bar.close()
    if failed:
        raise PipelineError(f"{len(failed)} of {len(units)} runs failed ({', '.join(failed)}); the others are finished. "
                            f"Each run's run.log says why; rerun the same command to retry only those.")


def run_pass(pool, cfg, units, threads, failed, bar, wait):
    """Every unit once in the pool; returns those another process held (only when not waiting)."""
    parent = os.getpid()
    futures = {pool.submit(worker, cfg, spec, split, threads, parent, wait): (spec, split) for spec, split in units}
    busy = []
    for future in as_completed(futures):
        unit = futures[future]
        try:
            result = future.result()
        except Exception as e:
            failed.append(tag(unit))
            log(f"[{tag(unit)}] FAILED ({type(e).__name__}: {e}); the other runs go on")
            bar.update()
            continue
        if skipped(cfg, unit, result):
            busy.append(unit)
            continue
        by = trained_by(run_dir(cfg, unit[0].name, unit[1])) or "an earlier run"
        log(f"{fold_line(tag(unit), result, cfg.threshold_rule)} | by {by}")
        bar.update()
    return busy
