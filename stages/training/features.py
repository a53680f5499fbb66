"""Frozen-backbone features: each cached field's backbone feature maps (one per selected stage, flattened side by
side) in the ORIENTATIONS views (flips, the half turn), computed once per backbone, weights, field shape and stages
and kept as an fp16 memory map beside the image cache; and, for the linear probe, each field's maps mean-pooled per
stage (plain view), a small float32 file. Each file is built once, by one process."""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backbones import REFERENCE_MODEL, model_config
from backbones.common import feature_backbone, normalization
from preprocess.cache import build_once, cache_folder, drop_dead_tmp
from preprocess.transforms import ORIENTATIONS, normalize, orient, to_float
from preprocess.tuples import Resident
from stages.training.forward import autocast
from utils.checks import need_space
from utils.env import amp_dtype, fits_on_gpu
from utils.helpers import PipelineError, log

VIEWS = ORIENTATIONS
CHUNK = 64


def extractor(cfg, stage=None):
    """The frozen backbone read at `stage` (default --feature-stage); a random-init one is drawn from --seed, so every
    run of the process gets the same."""
    stage = tuple(stage or cfg.feature_stage)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        try:
            net = feature_backbone(model_config(cfg, REFERENCE_MODEL, 1, feature_stage=stage))
        except IndexError:
            raise PipelineError(f"--feature-stage {stage_text(stage)} is not a list of stages of backbone "
                                f"'{cfg.backbone}'. Pick indices from 0 to n-1, or -1 for the last stage.") from None
    return net.eval().requires_grad_(False)


def stage_text(stage):
    return ",".join(map(str, stage))


def weights_key(cfg):
    if cfg.pretrained_path:
        st = os.stat(cfg.pretrained_path)
        return f"{Path(cfg.pretrained_path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return "hub" if cfg.pretrained else f"random|{cfg.seed}"


def feature_path(cfg, bank, stage, kind="features"):
    key = json.dumps([cfg.backbone, weights_key(cfg), list(bank.shape), list(stage), VIEWS, Path(bank.source).name,
                      kind])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    height, width = bank.shape
    return cache_folder(cfg) / f"{kind}_{cfg.backbone.replace('/', '_')}_{width}x{height}_{digest}.npy"


@torch.no_grad()
def stage_shapes(net, height, width):
    """(C, h, w) of each stage's maps for height x width inputs."""
    return [tuple(f.shape[1:]) for f in net.cpu()(torch.zeros(1, 3, height, width))]


@torch.no_grad()
def embed_views(net, images, device, norm, views=VIEWS):
    """(n, views, D) fp16: every stage's feature maps of uint8 (n, H, W, 3) fields, flattened and concatenated."""
    x = normalize(to_float(images[:, None], device), **norm)[:, 0]
    with autocast(device, amp_dtype(device) if device.type == "cuda" else None):
        maps = [torch.cat([f.flatten(1) for f in net(orient(x, k))], 1) for k in range(views)]
    return torch.stack(maps, 1).half().cpu().numpy()


@torch.no_grad()
def embed_pooled(net, images, device, norm):
    """(n, sum of channels) float32: each stage's maps of uint8 fields mean-pooled, stages side by side."""
    x = normalize(to_float(images[:, None], device), **norm)[:, 0]
    with autocast(device, amp_dtype(device) if device.type == "cuda" else None):
        return torch.cat([f.float().mean((2, 3)) for f in net(x)], 1).cpu().numpy()


def unflatten(flat, shapes):
    """(..., D) -> one (..., C, h, w) tensor per stage."""
    sizes = [c * h * w for c, h, w in shapes]
    return [part.unflatten(-1, shape) for part, shape in zip(flat.split(sizes, -1), shapes)]


def write_rows(target, embed, n, dtype):
    """Every chunk of `n` fields through `embed(start, end)` into a temp .npy, renamed into place."""
    first = embed(0, 1)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npy")
    need_space("the frozen-backbone feature cache", target.parent, n * first[0].size * np.dtype(dtype).itemsize)
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,) + first.shape[1:])
    for start in range(0, n, CHUNK):
        store[start:start + CHUNK] = embed(start, min(n, start + CHUNK))
    store.flush()
    del store
    os.replace(tmp, target)


def build_features(net, norm, bank, target, device, pooled=False):
    """Every field of the bank through the frozen backbone: its maps in every view, or pooled."""
    net = net.to(device)
    if pooled:
        write_rows(target, lambda a, b: embed_pooled(net, bank.host[a:b], device, norm), len(bank.host), np.float32)
    else:
        write_rows(target, lambda a, b: embed_views(net, bank.host[a:b], device, norm), len(bank.host), np.float16)
    net.cpu()


class FeatureBank(Resident):
    """Cached feature maps (N, VIEWS, D) fp16, D the flattened stages side by side: on the GPU when they fit, else
    memory-mapped; a batch reads a random view of each field when training and the plain view otherwise."""

    def __init__(self, store, shapes, row_of, backbone_state):
        self.store = store
        self.shapes = shapes
        self.row_of = row_of
        self.backbone_state = backbone_state
        self.placed = {}

    def place(self, device):
        if fits_on_gpu(self.store.nbytes, device):
            return torch.from_numpy(np.ascontiguousarray(self.store)).to(device)
        return self.store

    def batch(self, rows, device, train, normalization=None):
        rows = torch.as_tensor(np.asarray(rows))
        present = rows >= 0
        views = torch.randint(0, VIEWS, rows.shape) if train else torch.zeros_like(rows)
        store = self.on(device)
        flat, flat_views = rows.clamp_min(0).flatten(), views.flatten()
        if torch.is_tensor(store):
            maps = store[flat.to(store.device), flat_views.to(store.device)]
        else:
            maps = torch.from_numpy(store[flat.numpy(), flat_views.numpy()])
        maps = maps.to(device, non_blocking=True).float().unflatten(0, rows.shape)
        mask = present.to(device)
        return [m * mask.view(*mask.shape, 1, 1, 1) for m in unflatten(maps, self.shapes)], mask

    def image_maps(self, row, k=0):
        """Each stage's maps (C, h, w) of one cached field in view k."""
        return unflatten(torch.from_numpy(self.store[row, k].astype(np.float32)), self.shapes)


def install_backbone(model, state):
    """The frozen extractor's weights into every backbone of the model, so its checkpoint reads images as trained."""
    nets = model.backbone_modules()
    for net in nets if isinstance(nets, torch.nn.ModuleList) else [nets]:
        net.load_state_dict(state)


def built(cfg, bank, device, stage, pooled):
    """(the cached file of the bank's features at `stage`, the extractor): built once, by one process."""
    target = feature_path(cfg, bank, stage, "pooled" if pooled else "features")
    net = extractor(cfg, stage)

    def build():
        what = "mean-pooled" if pooled else f"{VIEWS} views"
        log(f"Frozen backbone {cfg.backbone}: embedding {len(bank.host)} fields ({what}) at stage(s) "
            f"{stage_text(stage)} -> {target}")
        drop_dead_tmp(target.parent, f"{target.name.split('_')[0]}_*.tmp.npy")
        build_features(net, normalization(cfg.backbone), bank, target, device, pooled)

    target.parent.mkdir(parents=True, exist_ok=True)
    build_once(target, build, "the frozen-backbone cache")
    return target, net


_FEATURES = {}


def feature_bank(cfg, bank, device):
    """The FeatureBank of an image bank under the config's backbone, weights, field shape and stage."""
    target = feature_path(cfg, bank, cfg.feature_stage)
    if str(target) in _FEATURES:
        return _FEATURES[str(target)]
    target, net = built(cfg, bank, device, tuple(cfg.feature_stage), pooled=False)
    _FEATURES.clear()
    shapes = stage_shapes(net, *bank.shape)
    _FEATURES[str(target)] = FeatureBank(np.load(target, mmap_mode="r"), shapes, bank.row_of, net.state_dict())
    return _FEATURES[str(target)]


@dataclass
class Pooled:
    """Mean-pooled plain-view features (N, sum of channels) of every field, and the frozen extractor's weights."""
    values: np.ndarray
    backbone_state: dict


def pooled_features(cfg, bank, device, stage):
    """The Pooled features of every field of the bank at `stage`."""
    target, net = built(cfg, bank, device, tuple(stage), pooled=True)
    return Pooled(np.load(target), net.state_dict())
