"""Decode every PNG once into a uint8 array on disk, memory-mapped on load: every field at its own aspect ratio (short
side `--image-size`), one process building it while the others wait."""
import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
import torchstain

from utils.checks import need_space
from utils.helpers import PipelineError, log, output_path, warn
from utils.lock import alive, file_lock

STAIN = torchstain.normalizers.MacenkoNormalizer(backend="torch")
_OPEN = {}


def cache_folder(cfg):
    return Path(cfg.cache_dir) if cfg.cache_dir else output_path(cfg, "cache")


def fingerprint(paths):
    """Hash of the source files: path, size and modification time of each, in order."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_path(folder, shape, stain_norm, paths):
    tag = "_macenko" if stain_norm else ""
    return Path(folder) / f"images_{shape[1]}x{shape[0]}{tag}_{fingerprint(paths)}.npy"


def field_shape(widths, heights, size):
    """(height, width) every field is cached at: short side `size`, the other side from the fields' median aspect
    ratio (700x460 BreakHis fields at 224: 224 x 341)."""
    aspect = float(np.median(np.asarray(widths, float) / np.asarray(heights, float)))
    if aspect >= 1:
        return size, max(size, round(size * aspect))
    return max(size, round(size / aspect)), size


def fit_field(img, shape):
    """An RGB field resized without distortion to cover `shape` (height, width), then cropped to it at the centre: a
    field of the common aspect fits exactly, another (700x456) loses a few pixels at its long ends."""
    height, width = shape
    scale = max(height / img.shape[0], width / img.shape[1])
    size = (max(width, round(img.shape[1] * scale)), max(height, round(img.shape[0] * scale)))
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    top, left = (img.shape[0] - height) // 2, (img.shape[1] - width) // 2
    return img[top:top + height, left:left + width]


def tissue_fraction(rgb, io=240, beta=0.15):
    """Share of pixels whose optical density exceeds `beta` in every channel."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float32) + 1) / io)
    return float(np.mean(np.all(od > beta, axis=1)))


def macenko(rgb, min_tissue=0.1):
    """(Macenko normalisation (torchstain) to a fixed H&E reference, ''), or (the raw image, why) for background or a
    failed fit."""
    if tissue_fraction(rgb) < min_tissue:
        return rgb, "background"
    try:
        norm, _, _ = STAIN.normalize(torch.from_numpy(rgb).permute(2, 0, 1), stains=False)
    except RuntimeError:
        return rgb, "failed fit"
    if norm.min() < 0:  # a NaN from a degenerate fit casts to a negative int
        return rgb, "failed fit"
    return norm.numpy().astype(np.uint8), ""


def decode(path, shape, stain_norm=False):
    """(One PNG as an RGB uint8 (height, width, 3) array: the whole field at its own aspect ratio (fit_field), why
    Macenko left it as it is or '')."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise PipelineError(f"cannot decode {path}. Rerun the 'analyze' stage so unreadable images are excluded.")
    img = fit_field(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), shape)
    return macenko(img) if stain_norm else (img, "")


def log_fallbacks(reasons, stain_norm):
    """One line counting the images Macenko normalisation left as they were, and why."""
    if not stain_norm:
        return
    counts = Counter(r for r in reasons if r)
    kept = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
    log(f"Macenko stain normalisation: {len(reasons) - sum(counts.values())} of {len(reasons)} images normalised"
        + (f"; left as they are: {kept}" if kept else ""))


def build_cache(paths, target, shape, stain_norm):
    """Decode `paths` into a .npy written atomically at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npy")
    need_space("the image cache", target.parent, len(paths) * shape[0] * shape[1] * 3)
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *shape, 3))
    reasons = decode_into(store, paths, shape, stain_norm)
    del store
    os.replace(tmp, target)
    log_fallbacks(reasons, stain_norm)


def decode_into(store, paths, shape, stain_norm, failed=None):
    """Decode `paths` into the rows of `store` in parallel threads and flush it; why Macenko left each image as it was
    ('' where it normalised it). With `failed` (a list), an unreadable file is recorded there as
    (index, why) instead of stopping."""
    reasons = [""] * len(paths)

    def work(i):
        try:
            store[i], reasons[i] = decode(paths[i], shape, stain_norm)
        except (PipelineError, cv2.error):
            if failed is None:
                raise
            failed.append((i, "unreadable image (cannot be decoded)"))

    with ThreadPoolExecutor(min(16, (os.cpu_count() or 2) * 2)) as pool:
        list(pool.map(work, range(len(paths))))
    if hasattr(store, "flush"):
        store.flush()
    return reasons


def drop_stale(target):
    """Caches of the same size for older source files, and half-built ones whose builder process is gone."""
    prefix = target.name.rsplit("_", 1)[0] + "_"
    for old in target.parent.glob(prefix + "*.npy"):
        if old != target and "_" not in old.name[len(prefix):] and "." not in old.stem:
            old.unlink(missing_ok=True)
    drop_dead_tmp(target.parent, prefix + "*.tmp.npy")


def drop_dead_tmp(folder, pattern):
    """Half-built `<name>.<pid>.tmp.npy` files whose builder process is gone."""
    for tmp in folder.glob(pattern):
        pid = tmp.name.split(".")[-3]
        if pid.isdigit() and not alive(int(pid)):
            tmp.unlink(missing_ok=True)


def build_once(target, build, what):
    """Build `target` with `build()` unless it exists: one process builds it under a lock beside it, the others wait
    for that process and then read its file."""
    if target.exists():
        return
    with file_lock(target.with_name(f".{target.name}.lock"), f"{what} {target}"):
        if not target.exists():
            build()


def image_cache(paths, shape, stain_norm, folder):
    """(memory-mapped uint8 array (N, height, width, 3), its .npy file, {path: row}) of `paths` fitted to `shape`
    (field_shape), Macenko normalised or not, cached in `folder`; built once, on first use."""
    paths = [str(p) for p in paths]
    shape = tuple(int(v) for v in shape)
    target = cache_path(folder, shape, stain_norm, paths)
    if str(target) in _OPEN:
        return _OPEN[str(target)]

    def build():
        log(f"Caching {len(paths)} images at {shape[1]}x{shape[0]} -> {target}")
        drop_stale(target)
        build_cache(paths, target, shape, stain_norm)

    target.parent.mkdir(parents=True, exist_ok=True)
    build_once(target, build, "the image cache")
    try:
        arr = np.load(target, mmap_mode="r")
    except (ValueError, OSError) as e:
        warn(f"image cache {target} is unreadable ({e}); rebuilding it")
        target.unlink(missing_ok=True)
        build_once(target, build, "the image cache")
        arr = np.load(target, mmap_mode="r")
    _OPEN[str(target)] = (arr, target, {p: i for i, p in enumerate(paths)})
    return _OPEN[str(target)]
