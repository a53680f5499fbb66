"""Decode every PNG once into a resized uint8 array on disk, memory-mapped on load."""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from utils.helpers import PipelineError, log, out, warn

HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAX_C_REF = np.array([1.9705, 1.0308])
_OPEN = {}


def cache_folder(cfg):
    return Path(cfg.cache_dir) if cfg.cache_dir else out(cfg, "cache")


def fingerprint(paths):
    """Hash of the source files: path, size and modification time of each, in order."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_path(cfg, paths):
    tag = "_macenko" if cfg.stain_norm else ""
    return cache_folder(cfg) / f"images_{cfg.image_size}{tag}_{fingerprint(paths)}.npy"


def tissue_fraction(od, beta=0.15):
    return float(np.mean(np.all(od > beta, axis=1)))


def macenko_fit(od, beta, alpha):
    """Stain vectors from the extreme angles in the plane of the two main OD directions, rescaled to the reference."""
    tissue = od[np.all(od > beta, axis=1)]
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    vecs = vecs[:, [1, 2]]
    plane = tissue @ vecs
    phi = np.arctan2(plane[:, 1], plane[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = vecs @ np.array([np.cos(lo), np.sin(lo)])
    v2 = vecs @ np.array([np.cos(hi), np.sin(hi)])
    he = np.array([v1, v2]).T if v1[0] > v2[0] else np.array([v2, v1]).T
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    conc *= (MAX_C_REF / np.percentile(conc, 99, axis=1))[:, None]
    return 240 * np.exp(-HE_REF @ conc)


def macenko(rgb, alpha=1.0, beta=0.15, min_tissue=0.1):
    """Macenko stain normalisation to a reference H&E; the raw image when it is mostly background or the fit fails."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / 240)
    if tissue_fraction(od, beta) < min_tissue:
        return rgb
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            norm = macenko_fit(od, beta, alpha)
    except (np.linalg.LinAlgError, ValueError):
        return rgb
    if not np.all(np.isfinite(norm)):
        return rgb
    return np.clip(norm.T, 0, 255).reshape(rgb.shape).astype(np.uint8)


def decode(path, size, stain_norm=False):
    """One PNG as an RGB uint8 (size, size, 3) array: the whole field of view resized square."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise PipelineError(f"cannot decode {path}. Rerun the 'analyze' stage so unreadable images are excluded.")
    img = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA)
    return macenko(img) if stain_norm else img


def build_cache(cfg, paths, target, threads=None):
    """Decode `paths` in parallel threads into a .npy written atomically at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npy")
    size = cfg.image_size
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    threads = threads or min(16, (os.cpu_count() or 2) * 2)

    def work(i):
        arr[i] = decode(paths[i], size, cfg.stain_norm)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(len(paths))))
    arr.flush()
    del arr
    os.replace(tmp, target)


def drop_stale(target):
    prefix = target.name.rsplit("_", 1)[0] + "_"
    for old in target.parent.glob(prefix + "*.npy"):
        if old != target and "_" not in old.name[len(prefix):] and "." not in old.stem:
            old.unlink(missing_ok=True)


def image_cache(cfg, paths):
    """(memory-mapped uint8 array (N, S, S, 3), its .npy file, {path: row}) for `paths`, built on first use."""
    paths = [str(p) for p in paths]
    target = cache_path(cfg, paths)
    if str(target) in _OPEN:
        return _OPEN[str(target)]
    if not target.exists():
        log(f"Caching {len(paths)} images at {cfg.image_size}x{cfg.image_size} -> {target}")
        drop_stale(target)
        build_cache(cfg, paths, target)
    try:
        arr = np.load(target, mmap_mode="r")
    except (ValueError, OSError) as e:
        warn(f"image cache {target} is unreadable ({e}); rebuilding it")
        build_cache(cfg, paths, target)
        arr = np.load(target, mmap_mode="r")
    _OPEN[str(target)] = (arr, target, {p: i for i, p in enumerate(paths)})
    return _OPEN[str(target)]
