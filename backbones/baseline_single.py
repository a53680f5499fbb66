"""Single-magnification baseline: the MMNet backbone and heads on one magnification of the tuple."""
import torch.nn as nn

from utils.helpers import PipelineError

from .our.model import MAGNIFICATIONS, create_backbone, make_heads, split_params


def mag_index(magnifications, mag):
    if mag not in magnifications:
        raise PipelineError(f"magnification '{mag}' is not in the input tuple {tuple(magnifications)}")
    return list(magnifications).index(mag)


def one_hot_weights(x, index):
    weights = x.new_zeros(x.shape[:2], dtype=x.dtype).float()
    weights[:, index] = 1.0
    return weights


class SingleMag(nn.Module):
    """Backbone -> global average pooling -> MLP -> two heads, reading only magnification `mag`."""

    def __init__(self, magnifications=MAGNIFICATIONS, num_subtypes=8, mag="40X", backbone="mobilenetv4_conv_small",
                 pretrained=True, pretrained_path="", drop_rate=0.3, embed_dim=256):
        super().__init__()
        self.magnifications = tuple(magnifications)
        self.mag = mag
        self.used_mags = [mag_index(self.magnifications, mag)]
        self.backbone = create_backbone(backbone, pretrained, pretrained_path, features_only=True, out_indices=(-1,))
        self.num_features = self.backbone.feature_info.channels()[-1]
        self.embed_dim = embed_dim
        self.feature_tap = nn.Identity()
        self.mlp = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, embed_dim), nn.GELU())
        self.head_drop, self.binary_head, self.subtype_head = make_heads(embed_dim, num_subtypes, drop_rate)

    def cam_layers(self):
        return [self.feature_tap]

    def param_groups(self):
        return split_params(self, self.backbone)

    def forward_features(self, x, mask=None):
        feats = self.feature_tap(self.backbone(x[:, self.used_mags[0]])[-1])
        return self.mlp(feats.mean((2, 3)))

    def forward_head(self, embedding):
        return self.binary_head(self.head_drop(embedding)).squeeze(-1), self.subtype_head(embedding)

    def forward(self, x, mask=None):
        embedding = self.forward_features(x, mask)
        binary, subtype = self.forward_head(embedding)
        return dict(binary_logits=binary, subtype_logits=subtype, embedding=embedding,
                    mag_weights=one_hot_weights(x, self.used_mags[0]), hma_weights=None, spatial_maps=None)
