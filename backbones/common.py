"""Pieces every model shares: the model config, timm backbones, masked feature extraction, MLP, heads, base class."""
from dataclasses import dataclass, fields
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from config import MAGNIFICATIONS
from utils.helpers import PipelineError, log, warn


@dataclass
class ModelConfig:
    """What a model is built from; checkpoints store it as the `model_kwargs` dict."""
    magnifications: tuple = MAGNIFICATIONS
    num_subtypes: int = 8
    backbone: str = "mobilenetv4_conv_small"
    pretrained: bool = True
    pretrained_path: str = ""
    drop_rate: float = 0.3
    embed_dim: int = 256
    shared_backbone: bool = True
    use_spatial: bool = True
    use_channel: bool = True
    use_hma: bool = True
    use_cmf: bool = True
    use_mags: tuple | None = None
    mag: str = "40X"
    freeze: bool = True

    def __post_init__(self):
        self.magnifications = tuple(self.magnifications)
        if self.use_mags is not None:
            self.use_mags = tuple(self.use_mags)


def config_from(defaults, kwargs):
    """ModelConfig from a model's defaults and keyword overrides; unknown keys are a PipelineError."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise PipelineError(f"unknown model setting(s) {', '.join(unknown)}. Valid settings: {', '.join(sorted(known))}")
    return ModelConfig(**dict(defaults, **kwargs))


def create_backbone(name, pretrained=True, pretrained_path="", **kwargs):
    """timm model with ImageNet weights from the hub, a local file, or random init; clear errors otherwise."""
    if not timm.is_model(name):
        raise PipelineError(f"unknown timm backbone '{name}'. Pick a name from timm.list_models(), e.g. mobilenetv4_conv_small.")
    if pretrained_path:
        return from_file(name, Path(pretrained_path), **kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        raise PipelineError(
            f"could not load ImageNet weights for backbone '{name}' ({type(e).__name__}: {str(e)[:200]}). "
            f"Either train from random init with --no-pretrained, or download the timm weights for '{name}' "
            f"on a machine with network and pass --pretrained-path FILE (config field pretrained_path)."
        ) from None


def from_file(name, path, **kwargs):
    """timm model with weights from a local file, checked to have arrived: timm skips names it does not know."""
    if not path.is_file():
        raise PipelineError(f"--pretrained-path {path} does not exist (weights file for backbone '{name}').")
    try:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        share = loaded_share(net, timm.models.load_state_dict(str(path)))
    except (RuntimeError, KeyError, ValueError, OSError, AssertionError) as e:
        raise PipelineError(f"--pretrained-path {path} is not a weights file for backbone '{name}' "
                            f"({type(e).__name__}: {str(e)[:200]}).") from None
    if share < 0.5:
        raise PipelineError(f"--pretrained-path {path} is not a weights file for backbone '{name}': only {share:.0%} "
                            f"of its weight tensors are in the file. Pass the file made for '{name}'.")
    if share < 1:
        warn(f"--pretrained-path {path}: {share:.0%} of backbone '{name}' weight tensors found in the file; the rest "
             f"keep their random init")
    norm = normalization(name)
    log(f"backbone {name}: weights from {path}; inputs normalised with mean {norm['mean']} std {norm['std']} "
        f"(timm's pretrained config of {name})")
    return net


def loaded_share(net, state):
    """Share of the network's float tensors equal (by shape and checksum) to one in the state dict."""
    def key(t):
        return tuple(t.shape), float(t.double().sum()), float(t.double().abs().sum())
    have = {key(t) for t in state.values() if torch.is_tensor(t) and t.is_floating_point()}
    mine = [key(t) for t in net.state_dict().values() if t.is_floating_point()]
    return sum(k in have for k in mine) / max(1, len(mine))


def normalization(name):
    """Input mean and std of the backbone's timm pretrained config (ImageNet's where timm has none)."""
    cfg = timm.models.get_pretrained_cfg(name)
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return dict(mean=[float(v) for v in mean], std=[float(v) for v in std])


def feature_backbone(cfg):
    """The config's timm backbone returning its last-stage feature map only."""
    return create_backbone(cfg.backbone, cfg.pretrained, cfg.pretrained_path, features_only=True, out_indices=(-1,))


def present_mask(x, mask):
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(device=x.device, dtype=torch.bool)


def masked_forward(net, images, present):
    """Last-stage features of (N, 3, H, W) images; absent ones are zeroed before the backbone and their features after.

    One static-shape path (no gather, no host sync), so torch.compile traces it whole. What an absent slot holds never
    reaches a present output; in train mode BatchNorm batch statistics do include the zero images.
    """
    absent = ~present.view(-1, 1, 1, 1)
    return net(images.masked_fill(absent, 0))[-1].masked_fill(absent, 0)


def magnification_features(backbones, images, present):
    """Feature maps (B*m, C, h, w), batch-major, of (B, m, 3, H, W) images on one shared or m separate backbones."""
    if len(backbones) == 1:
        return masked_forward(backbones[0], images.flatten(0, 1), present.flatten())
    feats = [masked_forward(net, images[:, j], present[:, j]) for j, net in enumerate(backbones)]
    return torch.stack(feats, 1).flatten(0, 1)


def mlp(in_dim, embed_dim, drop_rate):
    """Dropout -> Linear -> GELU embedding on pooled features."""
    return nn.Sequential(nn.Dropout(drop_rate), nn.Linear(in_dim, embed_dim), nn.GELU())


def make_heads(dim, num_subtypes, drop_rate):
    """(dropout before the binary logit, binary head, subtype head) on one embedding."""
    return nn.Dropout(drop_rate), nn.Linear(dim, 1), nn.Sequential(nn.Dropout(drop_rate), nn.Linear(dim, num_subtypes))


def split_params(model, backbone):
    """(trainable backbone parameters, everything else) for a lower backbone learning rate."""
    ids = {id(p) for p in backbone.parameters()}
    return [p for p in backbone.parameters() if p.requires_grad], [p for p in model.parameters() if id(p) not in ids]


def mag_index(magnifications, mag):
    if mag not in magnifications:
        raise PipelineError(f"magnification '{mag}' is not in the input tuple {tuple(magnifications)}")
    return list(magnifications).index(mag)


def one_hot_weights(x, index):
    """Magnification weights (B, M) of a model that reads magnification `index` only."""
    weights = x.new_zeros(x.shape[:2], dtype=torch.float32)
    weights[:, index] = 1.0
    return weights


def uniform_weights(present):
    """Equal weights over the present magnifications; an all-absent row stays 0."""
    return present.float() / present.sum(1, keepdim=True).clamp_min(1)


class MagnificationModel(nn.Module):
    """Base of every model: one ModelConfig, a Grad-CAM feature tap, two heads and the output dict."""

    name = ""
    defaults = {}

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.magnifications = cfg.magnifications
        self.normalization = normalization(cfg.backbone)
        self.feature_tap = nn.Identity()

    def init_heads(self, dim):
        self.embed_dim = dim
        self.head_drop, self.binary_head, self.subtype_head = make_heads(dim, self.cfg.num_subtypes, self.cfg.drop_rate)

    def backbone_modules(self):
        return self.backbone

    def cam_layers(self):
        """Grad-CAM target: backbone feature maps (B*m, C, h, w), batch-major over the used magnifications."""
        return [self.feature_tap]

    def param_groups(self):
        return split_params(self, self.backbone_modules())

    def forward_head(self, embedding):
        return self.binary_head(self.head_drop(embedding)).squeeze(-1), self.subtype_head(embedding)

    def outputs(self, embedding, mag_weights, hma_weights=None, spatial_maps=None):
        """The output dict every model returns."""
        binary, subtype = self.forward_head(embedding)
        return dict(binary_logits=binary, subtype_logits=subtype, embedding=embedding, mag_weights=mag_weights,
                    hma_weights=hma_weights, spatial_maps=spatial_maps)


class SingleMagnificationModel(MagnificationModel):
    """A model reading one magnification `cfg.mag` of the tuple: backbone -> embedding -> two heads."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mag = cfg.mag
        self.used_mags = [mag_index(self.magnifications, cfg.mag)]

    def embed(self, images):
        raise NotImplementedError

    def forward_features(self, x, mask=None):
        return self.embed(x[:, self.used_mags[0]])

    def forward(self, x, mask=None):
        return self.outputs(self.forward_features(x, mask), one_hot_weights(x, self.used_mags[0]))
