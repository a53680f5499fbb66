"""Single-magnification baseline: the MMNet backbone and heads on one magnification of the tuple."""
from .common import SingleMagnificationModel, feature_backbone, mlp


class SingleMag(SingleMagnificationModel):
    """Backbone -> global average pooling -> MLP -> two heads, reading only magnification `cfg.mag`."""

    name = "single_mag"
    takes_features = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.backbone = feature_backbone(cfg)
        self.num_features = self.backbone.feature_info.channels()[-1]
        self.mlp = mlp(self.num_features, cfg.embed_dim, cfg.drop_rate)
        self.init_heads(cfg.embed_dim)

    def embed(self, images):
        feats = self.feature_tap(images if self.on_features else self.backbone(images)[-1])
        return self.mlp(feats.mean((2, 3)))
