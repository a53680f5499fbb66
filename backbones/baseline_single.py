"""Single-magnification baseline: the MMNet backbone and heads on one magnification of the tuple."""
from .common import SingleMagnificationModel, feature_backbone, mlp, pooled_stages, stage_channels


class SingleMag(SingleMagnificationModel):
    """Backbone -> global average pooling (per stage, concatenated) -> MLP -> two heads, on one slot: one
    magnification, or 'any' (the magnification-independent classifier)."""

    name = "single_mag"
    takes_features = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.backbone = feature_backbone(cfg)
        self.num_features = sum(stage_channels(self.backbone))
        self.mlp = mlp(self.num_features, cfg.embed_dim, cfg.drop_rate)
        self.init_heads(cfg.embed_dim)

    def embed(self, images):
        feats = list(images) if self.on_features else self.backbone(images)
        feats[-1] = self.feature_tap(feats[-1])
        return self.mlp(pooled_stages(feats))
