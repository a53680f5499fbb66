"""Linear-probe baseline (the eva protocol) as a model: each image's frozen backbone maps, mean-pooled per stage and
standardised, through a logistic regression; a tuple's probability is the mean over its present images'. Its weights
come from scikit-learn (stages/training/probe.py), so its checkpoint reads images like every other model's."""
import torch
import torch.nn as nn

from .common import MagnificationModel, feature_backbone, magnification_features, pooled_stages, present_mask, \
    stage_channels, uniform_weights

NEVER = -1e4  # the logit of a subtype the probe never saw in training


class LinearProbe(MagnificationModel):
    """Frozen backbone -> per-stage mean pooling -> (x - mean) / scale -> linear binary and subtype logits per image;
    the mean over a tuple's present images of each image's probabilities."""

    name = "linear_probe"
    takes_features = True
    fit = "probe"
    inner_models = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.used_mags = list(range(len(self.magnifications)))
        self.backbone = feature_backbone(cfg).eval().requires_grad_(False)
        self.num_features = sum(stage_channels(self.backbone))
        self.register_buffer("mean", torch.zeros(self.num_features))
        self.register_buffer("scale", torch.ones(self.num_features))
        self.binary = nn.Linear(self.num_features, 1)
        self.subtype = nn.Linear(self.num_features, cfg.num_subtypes)
        self.embed_dim = self.num_features

    def set_weights(self, mean, scale, binary, subtype):
        """The fitted scaler (mean, scale) and the (coef, intercept) pairs of the binary and subtype regressions;
        subtype rows for the classes the fit saw, by class index (a dict), the others never predicted."""
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
            self.binary.weight.copy_(torch.as_tensor(binary[0], dtype=torch.float32).view(1, -1))
            self.binary.bias.copy_(torch.as_tensor(binary[1], dtype=torch.float32).view(1))
            self.subtype.weight.zero_()
            self.subtype.bias.fill_(NEVER)
            for k, (coef, intercept) in subtype.items():
                self.subtype.weight[k] = torch.as_tensor(coef, dtype=torch.float32)
                self.subtype.bias[k] = float(intercept)

    def backbone_parameters(self):
        return []

    def forward(self, x, mask=None):
        present = present_mask(x, mask)
        feats = magnification_features([self.backbone], x, present, self.on_features)
        feats[-1] = self.feature_tap(feats[-1])
        z = (pooled_stages(feats) - self.mean) / self.scale
        weights = uniform_weights(present)
        prob = (torch.sigmoid(self.binary(z).float()).view(present.shape) * weights).sum(1).clamp(1e-7, 1 - 1e-7)
        subtype = (self.subtype(z).float().softmax(1).unflatten(0, present.shape) * weights.unsqueeze(-1)).sum(1)
        embedding = (z.unflatten(0, present.shape) * weights.unsqueeze(-1)).sum(1)
        return dict(binary_logits=torch.logit(prob), subtype_logits=subtype.clamp_min(1e-12).log(),
                    embedding=embedding, mag_weights=weights, hma_weights=None, spatial_maps=None)
