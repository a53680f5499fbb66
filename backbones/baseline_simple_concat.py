"""Simple concatenation baseline: pooled backbone features of every magnification, concatenated, then an MLP."""
import torch.nn as nn

from .our.model import MAGNIFICATIONS, create_backbone, present_mask, run_present, make_heads, split_params


class SimpleConcat(nn.Module):
    """Shared backbone, global average pooling per magnification, zeros for absent ones, concat -> MLP -> two heads."""

    def __init__(self, magnifications=MAGNIFICATIONS, num_subtypes=8, backbone="mobilenetv4_conv_small", pretrained=True,
                 pretrained_path="", drop_rate=0.3, embed_dim=256):
        super().__init__()
        self.magnifications = tuple(magnifications)
        self.used_mags = list(range(len(self.magnifications)))
        self.backbone = create_backbone(backbone, pretrained, pretrained_path, features_only=True, out_indices=(-1,))
        self.num_features = self.backbone.feature_info.channels()[-1]
        self.embed_dim = embed_dim
        self.feature_tap = nn.Identity()
        self.mlp = nn.Sequential(
            nn.Dropout(drop_rate), nn.Linear(len(self.magnifications) * self.num_features, embed_dim), nn.GELU(),
        )
        self.head_drop, self.binary_head, self.subtype_head = make_heads(embed_dim, num_subtypes, drop_rate)

    def cam_layers(self):
        return [self.feature_tap]

    def param_groups(self):
        return split_params(self, self.backbone)

    def forward_features(self, x, mask=None):
        present = present_mask(x, mask)
        b, m = x.shape[:2]
        feats = self.feature_tap(run_present(self.backbone, x.flatten(0, 1), present.flatten()))
        pooled = feats.mean((2, 3)).unflatten(0, (b, m)) * present.unsqueeze(-1)
        return self.mlp(pooled.flatten(1)), present

    def forward_head(self, embedding):
        return self.binary_head(self.head_drop(embedding)).squeeze(-1), self.subtype_head(embedding)

    def forward(self, x, mask=None):
        embedding, present = self.forward_features(x, mask)
        binary, subtype = self.forward_head(embedding)
        weights = present.float() / present.sum(1, keepdim=True).clamp_min(1)
        return dict(binary_logits=binary, subtype_logits=subtype, embedding=embedding, mag_weights=weights,
                    hma_weights=None, spatial_maps=None)
