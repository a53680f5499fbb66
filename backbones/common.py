"""Pieces every model shares: the model config, masked feature extraction, MLP, heads, base class."""
from dataclasses import MISSING, dataclass, fields

import torch
import torch.nn as nn

from utils.helpers import PipelineError

from .encoders import create_backbone, feature_backbone, normalization

__all__ = ["ModelConfig", "MagnificationModel", "SingleMagnificationModel", "create_backbone", "feature_backbone",
           "normalization"]


@dataclass
class ModelConfig:
    """What a model is built from; checkpoints store it as the `model_kwargs` dict. The first eight come from the run's
    settings (backbones.model_config builds them from Config); the rest are the model's own choices and ablations.
    `magnifications` are the model's input slots: the magnification each slot's image comes from (MMNet's four,
    a single-magnification model's one, four of one magnification, or 'any')."""
    magnifications: tuple
    num_subtypes: int
    backbone: str
    pretrained: bool
    pretrained_path: str
    drop_rate: float
    feature_stage: tuple
    shared_backbone: bool
    embed_dim: int = 256
    use_spatial: bool = True
    use_channel: bool = True
    use_hma: bool = True
    use_cmf: bool = True
    freeze: bool = True

    def __post_init__(self):
        self.magnifications = tuple(self.magnifications)
        self.feature_stage = tuple(int(k) for k in self.feature_stage)


def config_from(defaults, kwargs):
    """ModelConfig from a model's defaults and keyword settings; unknown or missing settings are a PipelineError."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise PipelineError(f"unknown model setting(s) {', '.join(unknown)}. Valid settings: {', '.join(sorted(known))}")
    needed = sorted(f.name for f in fields(ModelConfig) if f.default is MISSING and f.name not in {**defaults, **kwargs})
    if needed:
        raise PipelineError(f"model setting(s) {', '.join(needed)} missing; build models with backbones.model_config")
    return ModelConfig(**dict(defaults, **kwargs))


def lead(x):
    """The input tensor that carries batch size, magnification count and device: images, or a cached stage's maps."""
    return x[0] if isinstance(x, (list, tuple)) else x


def select_mags(x, index):
    """Magnifications `index` (an int or a list) of images (B, M, ...) or of each cached stage's maps."""
    return [f[:, index] for f in x] if isinstance(x, (list, tuple)) else x[:, index]


def present_mask(x, mask):
    x = lead(x)
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(device=x.device, dtype=torch.bool)


def masked_forward(net, images, present):
    """Feature maps of (N, 3, H, W) images, one per selected stage; absent images are zeroed before the backbone and
    their features after.

    One static-shape path (no gather, no host sync), so torch.compile traces it whole. What an absent slot holds never
    reaches a present output; in train mode BatchNorm batch statistics do include the zero images.
    """
    absent = ~present.view(-1, 1, 1, 1)
    return [f.masked_fill(absent, 0) for f in net(images.masked_fill(absent, 0))]


def magnification_features(backbones, images, present, given=False):
    """Per stage, feature maps (B*m, C, h, w), batch-major, of (B, m, 3, H, W) images on one shared or m separate
    backbones; `given`: the inputs are already the per-stage maps (B, m, C, h, w) of the frozen-backbone cache."""
    if given:
        absent = ~present.flatten().view(-1, 1, 1, 1)
        return [maps.flatten(0, 1).masked_fill(absent, 0) for maps in images]
    if len(backbones) == 1:
        return masked_forward(backbones[0], images.flatten(0, 1), present.flatten())
    feats = [masked_forward(net, images[:, j], present[:, j]) for j, net in enumerate(backbones)]
    return [torch.stack(stage, 1).flatten(0, 1) for stage in zip(*feats)]


def stage_channels(backbone):
    """Channels of each selected stage of a features_only backbone, shallow to deep."""
    return list(backbone.feature_info.channels())


def pooled_stages(feats):
    """Global average pooling of each stage's maps, concatenated: (N, sum of channels)."""
    return torch.cat([f.mean((2, 3)) for f in feats], 1)


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


def one_slot_weights(x):
    """Magnification weights (B, 1) of a model with one slot."""
    return lead(x).new_ones(lead(x).shape[:2], dtype=torch.float32)


def uniform_weights(present):
    """Equal weights over the present magnifications; an all-absent row stays 0."""
    return present.float() / present.sum(1, keepdim=True).clamp_min(1)


class MagnificationModel(nn.Module):
    """Base of every model: one ModelConfig, a Grad-CAM feature tap, two heads and the output dict."""

    name = ""
    defaults = {}
    takes_features = False
    fit = "gradient"  # how the training stages fit it: gradient steps, or "probe" (scikit-learn on cached features)
    inner_models = False  # whether a run of it always trains inner models over its train+val patients (the probe's C)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.magnifications = cfg.magnifications
        self.normalization = normalization(cfg.backbone)
        self.feature_tap = nn.Identity()
        self.on_features = False

    @staticmethod
    def reads(cfg):
        """The magnifications a model built from `cfg` reads images of ('any': every magnification of the run)."""
        return tuple(dict.fromkeys(cfg.magnifications))

    def read_features(self, on=True):
        """Take cached backbone feature maps instead of images (frozen backbone); the backbone stays in the model."""
        if on and not self.takes_features:
            raise PipelineError(f"model '{self.name}' cannot train on cached backbone features")
        self.on_features = on
        for p in self.backbone_parameters():
            p.requires_grad_(not on)
        return self

    def backbone_parameters(self):
        return list(self.backbone_modules().parameters())

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
    """A model with one input slot (one magnification, or 'any'): backbone -> embedding -> two heads."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if len(cfg.magnifications) != 1:
            raise PipelineError(f"model '{self.name}' reads one slot, got {tuple(cfg.magnifications)}")
        self.mag = cfg.magnifications[0]
        self.used_mags = [0]

    def embed(self, images):
        raise NotImplementedError

    def forward_features(self, x, mask=None):
        return self.embed(select_mags(x, 0))

    def forward(self, x, mask=None):
        return self.outputs(self.forward_features(x, mask), one_slot_weights(x))
