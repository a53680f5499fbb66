"""Model cost: parameters, thop MACs (FLOPs = 2 x MACs) and median latency per forward pass."""
import copy
import statistics
import time
from contextlib import nullcontext

import torch


def count_params(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def count_macs(model, inputs):
    """thop multiply-accumulates on a deep copy, so thop's counter buffers never reach the real model."""
    from thop import profile
    clone = copy.deepcopy(model).eval()
    with torch.no_grad():
        macs, _ = profile(clone, inputs=inputs, verbose=False)
    return int(macs)


def time_forward(model, inputs, device, repeats=20, warmup=3):
    """Median wall time (ms) of a forward pass after warm-up; AMP autocast and synchronize on CUDA."""
    autocast = torch.autocast("cuda") if device.type == "cuda" else nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile_model(model, n_mags, image_size, device="cpu", threads=None, batch=1, repeats=20, warmup=3):
    """Params, trainable params, MACs/FLOPs (thop, one batch) and median latency of one batch of tuples."""
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        was_training = model.training
        model.eval().to(device)
        x = torch.randn(batch, n_mags, 3, image_size, image_size, device=device)
        mask = torch.ones(batch, n_mags, dtype=torch.bool, device=device)
        macs = count_macs(model, (x, mask))
        ms = time_forward(model, (x, mask), device, repeats, warmup)
        model.train(was_training)
    finally:
        torch.set_num_threads(old_threads)
    return dict(
        params=count_params(model), trainable_params=count_params(model, trainable=True), macs=macs, flops=2 * macs,
        macs_g=macs / 1e9, flops_g=2 * macs / 1e9, ms_median=ms, batch=batch, image_size=image_size, n_mags=n_mags,
        device=str(device), threads=threads or old_threads if device.type == "cpu" else None,
    )
