"""Where runs go: a stage's fixed list of (run, split) units, shared over torchrun ranks and --jobs processes."""
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
import torch.distributed as dist
from tqdm import tqdm

from stages.engine.run import fold_line, run_one
from utils.env import resolve_device
from utils.helpers import PipelineError, log, run_dir, setup_logging

GIB = 2**30
GIB_PER_RUN = 12


def init_distributed():
    """Join the torchrun process group (nccl on GPU, gloo on CPU) when launched with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


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


def job_count(cfg):
    """--jobs, or with --jobs 0 one process per GIB_PER_RUN GiB of free GPU memory (at most 4; 1 on CPU)."""
    if cfg.jobs > 0:
        return cfg.jobs
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(4, free // (GIB_PER_RUN * GIB)))


def run_units(cfg, units):
    """Run this rank's share (units r, r+N, ...) of a stage's units, in --jobs processes when asked."""
    mine = units[rank()::world_size()]
    jobs = min(job_count(cfg), len(mine))
    if jobs <= 1:
        for spec, split in mine:
            run_one(cfg, spec, split)
        return
    run_parallel(cfg, mine, jobs)


def exit_with(parent):
    """A worker whose parent died (killed, interrupted) stops too instead of training on unseen."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def worker(cfg, spec, split, threads, parent):
    """One run in a fresh process: its log goes to the run folder, the parent prints one line when it ends."""
    exit_with(parent)
    torch.set_num_threads(threads)
    setup_logging(run_dir(cfg, spec.name, split) / "run.log", console=False)
    return run_one(cfg, spec, split)


def run_parallel(cfg, units, jobs):
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failed = []
    log(f"{len(units)} runs in {jobs} processes; each run logs to its folder's run.log")
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(worker, cfg, spec, split, threads, os.getpid()): f"{spec.name}/{split}"
                   for spec, split in units}
        bar = tqdm(total=len(futures), desc="runs", disable=None, dynamic_ncols=True)
        for future in as_completed(futures):
            tag = futures[future]
            try:
                log(fold_line(tag, future.result(), cfg.threshold_rule))
            except Exception as e:
                failed.append(tag)
                log(f"[{tag}] FAILED ({type(e).__name__}: {e}); the other runs go on")
            bar.update()
        bar.close()
    if failed:
        raise PipelineError(f"{len(failed)} of {len(units)} runs failed ({', '.join(failed)}); the others are finished. "
                            f"Each run's run.log says why; rerun the same command to retry only those.")
