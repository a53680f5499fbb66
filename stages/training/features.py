"""Frozen-backbone features: each cached image's backbone feature maps (one per selected stage, flattened side by
side) in 8 fixed views (flips and quarter turns), computed once per backbone, weights, image size and stages, and kept
as an fp16 memory map beside the image cache."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from backbones import REFERENCE_MODEL, model_config
from backbones.common import feature_backbone, normalization
from preprocess.cache import cache_folder, drop_dead_tmp
from preprocess.transforms import normalize, to_float
from preprocess.tuples import Resident
from stages.training.forward import autocast
from utils.env import amp_dtype, fits_on_gpu
from utils.helpers import PipelineError, log

VIEWS = 8
CHUNK = 64


def view(x, k):
    """The k-th of the 8 dihedral views of (N, C, H, W) images: k mod 4 quarter turns, mirrored for k >= 4."""
    x = torch.rot90(x, k % 4, (2, 3))
    return x.flip(3) if k >= 4 else x


def extractor(cfg):
    """The frozen backbone; a random-init one is drawn from --seed, so every run of the process gets the same."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        try:
            net = feature_backbone(model_config(cfg, REFERENCE_MODEL, 1))
        except IndexError:
            raise PipelineError(f"--feature-stage {stage_text(cfg)} is not a list of stages of backbone "
                                f"'{cfg.backbone}'. Pick indices from 0 to n-1, or -1 for the last stage.") from None
    return net.eval().requires_grad_(False)


def stage_text(cfg):
    return ",".join(map(str, cfg.feature_stage))


def weights_key(cfg):
    if cfg.pretrained_path:
        st = os.stat(cfg.pretrained_path)
        return f"{Path(cfg.pretrained_path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return "hub" if cfg.pretrained else f"random|{cfg.seed}"


def feature_path(cfg, source):
    key = json.dumps([cfg.backbone, weights_key(cfg), cfg.image_size, list(cfg.feature_stage), VIEWS, Path(source).name])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_folder(cfg) / f"features_{cfg.backbone.replace('/', '_')}_{cfg.image_size}_{digest}.npy"


@torch.no_grad()
def stage_shapes(net, height, width):
    """(C, h, w) of each stage's maps for height x width inputs."""
    return [tuple(f.shape[1:]) for f in net.cpu()(torch.zeros(1, 3, height, width))]


@torch.no_grad()
def embed_views(net, images, device, norm):
    """(n, VIEWS, D) fp16: every stage's feature maps of uint8 (n, S, S, 3) images, flattened and concatenated."""
    x = normalize(to_float(images[:, None], device), **norm)[:, 0]
    with autocast(device, amp_dtype(device) if device.type == "cuda" else None):
        maps = [torch.cat([f.flatten(1) for f in net(view(x, k))], 1) for k in range(VIEWS)]
    return torch.stack(maps, 1).half().cpu().numpy()


def unflatten(flat, shapes):
    """(..., D) -> one (..., C, h, w) tensor per stage."""
    sizes = [c * h * w for c, h, w in shapes]
    return [part.unflatten(-1, shape) for part, shape in zip(flat.split(sizes, -1), shapes)]


def build_features(net, norm, bank, target, device):
    """Every image of the bank through the frozen backbone, written to a temp .npy and renamed into place."""
    net = net.to(device)
    first = embed_views(net, bank.host[:1], device, norm)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.npy")
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(bank.host),) + first.shape[1:])
    for start in range(0, len(bank.host), CHUNK):
        store[start:start + CHUNK] = embed_views(net, bank.host[start:start + CHUNK], device, norm)
    store.flush()
    del store
    os.replace(tmp, target)
    net.cpu()


class FeatureBank(Resident):
    """Cached feature maps (N, VIEWS, D) fp16, D the flattened stages side by side: on the GPU when they fit, else
    memory-mapped; a batch reads a random view of each image when training and the plain view otherwise."""

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
        """Each stage's maps (C, h, w) of one cached image in view k."""
        return unflatten(torch.from_numpy(self.store[row, k].astype(np.float32)), self.shapes)

    def pooled(self):
        """Mean-pooled plain-view features (N, sum of channels) for the linear probe, stages side by side."""
        parts = []
        for i in range(0, len(self.store), 256):
            maps = unflatten(torch.from_numpy(self.store[i:i + 256, 0].astype(np.float32)), self.shapes)
            parts.append(torch.cat([m.mean((2, 3)) for m in maps], 1).numpy())
        return np.concatenate(parts)


def install_backbone(model, state):
    """The frozen extractor's weights into every backbone of the model, so its checkpoint reads images as trained."""
    nets = model.backbone_modules()
    for net in nets if isinstance(nets, torch.nn.ModuleList) else [nets]:
        net.load_state_dict(state)


_FEATURES = {}


def feature_bank(cfg, bank, device):
    """The FeatureBank of an image bank under the config's backbone, weights, size and stage; built on first use."""
    target = feature_path(cfg, bank.source)
    if str(target) in _FEATURES:
        return _FEATURES[str(target)]
    net = extractor(cfg)
    if not target.exists():
        log(f"Frozen backbone {cfg.backbone}: embedding {len(bank.host)} images x {VIEWS} views at stage(s) "
            f"{stage_text(cfg)} -> {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        drop_dead_tmp(target.parent, "features_*.tmp.npy")
        build_features(net, normalization(cfg.backbone), bank, target, device)
    _FEATURES.clear()
    shapes = stage_shapes(net, *bank.host.shape[1:3])
    _FEATURES[str(target)] = FeatureBank(np.load(target, mmap_mode="r"), shapes, bank.row_of, net.state_dict())
    return _FEATURES[str(target)]
