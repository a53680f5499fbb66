"""Simple concatenation baseline: pooled backbone features of every magnification, concatenated, then an MLP."""
from .common import (MagnificationModel, feature_backbone, magnification_features, mlp, pooled_stages, present_mask,
                     stage_channels, uniform_weights)


class SimpleConcat(MagnificationModel):
    """Shared backbone, global average pooling per magnification (and stage), zeros for absent ones, concat -> MLP ->
    two heads."""

    name = "simple_concat"
    takes_features = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.used_mags = list(range(len(self.magnifications)))
        self.backbone = feature_backbone(cfg)
        self.num_features = sum(stage_channels(self.backbone))
        self.mlp = mlp(len(self.magnifications) * self.num_features, cfg.embed_dim, cfg.drop_rate)
        self.init_heads(cfg.embed_dim)

    def forward_features(self, x, mask=None):
        present = present_mask(x, mask)
        feats = magnification_features([self.backbone], x, present, self.on_features)
        feats[-1] = self.feature_tap(feats[-1])
        pooled = pooled_stages(feats).unflatten(0, present.shape) * present.unsqueeze(-1)
        return self.mlp(pooled.flatten(1)), present

    def forward(self, x, mask=None):
        embedding, present = self.forward_features(x, mask)
        return self.outputs(embedding, uniform_weights(present))
