"""MMNet: multi-magnification network with branch attention, MSAP, HMA and CMF on a timm backbone."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SEModule

from utils.helpers import PipelineError

from ..common import (MagnificationModel, feature_backbone, magnification_features, present_mask, select_mags,
                      stage_channels, uniform_weights)


def mag_order(mag):
    return int(str(mag).upper().rstrip("X"))


def slot_order(magnifications):
    """Indices of the input slots, lowest magnification first (slots of one magnification in their order)."""
    if not magnifications:
        raise PipelineError("MMNet needs at least one input slot (magnifications)")
    return sorted(range(len(magnifications)), key=lambda i: mag_order(magnifications[i]))


def masked_softmax(scores, mask, dim=-1):
    """Softmax over the present entries only; absent entries get 0 and an all-absent row stays all 0."""
    scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = scores.softmax(dim) * mask
    return weights / weights.sum(dim, keepdim=True).clamp_min(1e-12)


def scatter_mags(values, used, n_mags):
    """(B, m, ...) values of the used magnifications -> (B, M, ...) with zeros elsewhere."""
    full = values.new_zeros((values.shape[0], n_mags) + tuple(values.shape[2:]))
    full[:, used] = values
    return full


class SpatialAttention(nn.Module):
    """Depthwise-conv spatial attention: a sigmoid map (N, 1, h, w) that reweights every location."""

    def __init__(self, dim, kernel_size=7):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.pw = nn.Conv2d(dim, 1, 1)

    def forward(self, x):
        attn = self.pw(self.act(self.dw(x))).sigmoid()
        return x * attn, attn


class BranchAttention(nn.Module):
    """One magnification branch: SE channel attention, then depthwise spatial attention."""

    def __init__(self, dim, use_channel=True, use_spatial=True):
        super().__init__()
        self.channel = SEModule(dim, rd_ratio=1 / 16) if use_channel else None
        self.spatial = SpatialAttention(dim) if use_spatial else None

    def forward(self, x):
        if self.channel is not None:
            x = self.channel(x)
        if self.spatial is None:
            return x, None
        return self.spatial(x)


class MultiScaleAttentionPool(nn.Module):
    """MSAP: attention pooling over the cells of 1x1, 2x2 and 4x4 grids, then attention over the scales."""

    def __init__(self, dim, scales=(1, 2, 4)):
        super().__init__()
        self.scales = scales
        self.cell_score = nn.Linear(dim, 1, bias=False)
        self.scale_score = nn.Linear(dim, 1, bias=False)
        self.scale_bias = nn.Parameter(torch.zeros(len(scales)))

    def pool_scale(self, x, size):
        # contiguous: under channels_last the CPU kernel and torch.compile disagree on the pooled strides
        cells = F.adaptive_avg_pool2d(x, size).contiguous().flatten(2).transpose(1, 2)
        weights = self.cell_score(cells).softmax(1)
        return (weights * cells).sum(1)

    def forward(self, x):
        pooled = torch.stack([self.pool_scale(x, s) for s in self.scales], 1)
        weights = (self.scale_score(pooled).squeeze(-1) + self.scale_bias).softmax(1)
        return (weights.unsqueeze(-1) * pooled).sum(1)


class HierarchicalMagnificationAttention(nn.Module):
    """HMA: a GRU context runs 40x -> 400x over the present levels; attention picks a weight per level."""

    def __init__(self, dim):
        super().__init__()
        self.cell = nn.GRUCell(dim, dim)
        self.score = nn.Sequential(nn.Linear(dim, dim // 4), nn.Tanh(), nn.Linear(dim // 4, 1, bias=False))

    def forward(self, z, present):
        context = z.new_zeros(z.shape[0], z.shape[2])
        levels = []
        for t in range(z.shape[1]):
            keep = present[:, t:t + 1]
            context = torch.where(keep, self.cell(z[:, t], context), context)
            levels.append(context * keep)
        levels = torch.stack(levels, 1)
        weights = masked_softmax(self.score(levels).squeeze(-1), present)
        summary = (weights.unsqueeze(-1).to(levels.dtype) * levels).sum(1)
        return levels, summary, weights


class CrossMagnificationFusion(nn.Module):
    """CMF: learned global importance plus an input-dependent term per magnification -> weighted concatenation."""

    def __init__(self, dim, n_mags):
        super().__init__()
        self.importance = nn.Parameter(torch.zeros(n_mags))
        self.quality = nn.Linear(dim, 1, bias=False)
        self.proj = nn.Linear(n_mags * dim, dim)

    def forward(self, z, levels, present):
        weights = masked_softmax(self.importance + self.quality(z).squeeze(-1), present)
        weighted = levels * weights.unsqueeze(-1).to(levels.dtype) * levels.shape[1]
        return self.proj(weighted.flatten(1)), weights


class MMNet(MagnificationModel):
    """Multi-magnification network: per-magnification attention branches, MSAP, HMA, CMF and two heads.

    Each selected backbone stage has its own branches and MSAP; the pooled vectors of the stages are concatenated.
    HMA and CMF fuse the slots, so a model with a single slot (magnifications=('40X',)) has neither; four slots of one
    magnification (mmnet_fields_100X) fuse four fields of it.
    """

    name = "mmnet"
    takes_features = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.used_mags = slot_order(self.magnifications)
        self.shared_backbone = cfg.shared_backbone
        n_used = len(self.used_mags)
        n_backbones = 1 if cfg.shared_backbone else n_used
        self.backbones = nn.ModuleList([feature_backbone(cfg) for _ in range(n_backbones)])
        channels = stage_channels(self.backbones[0])
        self.num_features = sum(channels)
        self.branches = nn.ModuleList([  # stage-major: branch j of stage s at s * n_used + j
            BranchAttention(c, cfg.use_channel, cfg.use_spatial) for c in channels for _ in range(n_used)
        ])
        self.pools = nn.ModuleList([MultiScaleAttentionPool(c) for c in channels])
        self.proj = nn.Sequential(nn.Linear(self.num_features, cfg.embed_dim), nn.LayerNorm(cfg.embed_dim), nn.GELU())
        fusing = n_used > 1
        self.hma = HierarchicalMagnificationAttention(cfg.embed_dim) if cfg.use_hma and fusing else None
        self.cmf = CrossMagnificationFusion(cfg.embed_dim, n_used) if cfg.use_cmf and fusing else None
        self.init_heads(cfg.embed_dim * (2 if self.hma is not None else 1))

    def backbone_modules(self):
        return self.backbones

    def attend_stage(self, s, feats):
        """Branch attention and MSAP of one stage's maps (B, m, C, h, w): vectors (B, m, C) and spatial maps."""
        n_used = len(self.used_mags)
        vectors, maps = [], []
        for j in range(n_used):
            attended, attn = self.branches[s * n_used + j](feats[:, j])
            vectors.append(self.pools[s](attended))
            maps.append(attn)
        return torch.stack(vectors, 1), maps

    def forward_features(self, x, mask=None):
        """Per-magnification branch vectors (B, m, D), present mask (B, m) and the deepest stage's spatial maps
        (B, m, h, w)."""
        present = present_mask(x, mask)[:, self.used_mags]
        feats = magnification_features(self.backbones, select_mags(x, self.used_mags), present, self.on_features)
        feats[-1] = self.feature_tap(feats[-1])
        vectors, maps = [], None
        for s, stage in enumerate(feats):
            stage_vectors, maps = self.attend_stage(s, stage.unflatten(0, present.shape))
            vectors.append(stage_vectors)
        keep = present.unsqueeze(-1)
        z = self.proj(torch.cat(vectors, -1)) * keep
        spatial = None if maps[0] is None else torch.cat(maps, 1) * keep.unsqueeze(-1)
        return z, present, spatial

    def fuse(self, z, present):
        """HMA context and CMF weighting -> embedding, magnification weights and level weights."""
        levels, summary, hma_weights = z, None, None
        if self.hma is not None:
            levels, summary, hma_weights = self.hma(z, present)
        if self.cmf is not None:
            fused, mag_weights = self.cmf(z, levels, present)
        else:
            mag_weights = uniform_weights(present)
            fused = (mag_weights.unsqueeze(-1).to(levels.dtype) * levels).sum(1)
        embedding = fused if summary is None else torch.cat([fused, summary], 1)
        return embedding, mag_weights, hma_weights

    def forward(self, x, mask=None):
        z, present, spatial = self.forward_features(x, mask)
        embedding, mag_weights, hma_weights = self.fuse(z, present)
        n = len(self.magnifications)
        return self.outputs(
            embedding,
            scatter_mags(mag_weights, self.used_mags, n),
            hma_weights=None if hma_weights is None else scatter_mags(hma_weights, self.used_mags, n),
            spatial_maps=None if spatial is None else scatter_mags(spatial, self.used_mags, n),
        )
