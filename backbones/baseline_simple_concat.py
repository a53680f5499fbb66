"""Simple concatenation baseline: pooled backbone features of every magnification, concatenated, then an MLP."""
from .common import MagnificationModel, feature_backbone, magnification_features, mlp, present_mask, uniform_weights


class SimpleConcat(MagnificationModel):
    """Shared backbone, global average pooling per magnification, zeros for absent ones, concat -> MLP -> two heads."""

    name = "simple_concat"
    takes_features = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.used_mags = list(range(len(self.magnifications)))
        self.backbone = feature_backbone(cfg)
        self.num_features = self.backbone.feature_info.channels()[-1]
        self.mlp = mlp(len(self.magnifications) * self.num_features, cfg.embed_dim, cfg.drop_rate)
        self.init_heads(cfg.embed_dim)

    def forward_features(self, x, mask=None):
        present = present_mask(x, mask)
        feats = self.feature_tap(magnification_features([self.backbone], x, present, self.on_features))
        pooled = feats.mean((2, 3)).unflatten(0, present.shape) * present.unsqueeze(-1)
        return self.mlp(pooled.flatten(1)), present

    def forward(self, x, mask=None):
        embedding, present = self.forward_features(x, mask)
        return self.outputs(embedding, uniform_weights(present))
