"""ResNet50 ImageNet-transfer baseline on one magnification, with progressive unfreezing."""
import torch.nn as nn

from utils.helpers import PipelineError

from .baseline_single import mag_index, one_hot_weights
from .our.model import MAGNIFICATIONS, create_backbone, split_params

FROZEN = ("conv1", "layer1", "layer2", "layer3")


def freeze_early_layers(net):
    """Freeze conv1, layer1, layer2 and layer3[:-1]; layer3[-1], layer4 and every BatchNorm stay trainable."""
    if not hasattr(net, "layer3"):
        raise PipelineError(f"resnet50_transfer needs a ResNet backbone (conv1, layer1..layer4), got {type(net).__name__}")
    last_block = f"layer3.{len(net.layer3) - 1}."
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if not name.startswith(FROZEN) or name.startswith(last_block):
            continue
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)


class ResNet50Transfer(nn.Module):
    """ResNet50 (timm) -> Dropout(0.5)-Linear(2048,512)-BN-ReLU embedding -> Dropout(0.3) binary and subtype heads."""

    def __init__(self, magnifications=MAGNIFICATIONS, num_subtypes=8, mag="40X", backbone="resnet50",
                 pretrained=True, pretrained_path="", drop_rate=0.3, embed_dim=512, freeze=True):
        super().__init__()
        self.magnifications = tuple(magnifications)
        self.mag = mag
        self.used_mags = [mag_index(self.magnifications, mag)]
        self.backbone = create_backbone(backbone, pretrained, pretrained_path, num_classes=0, global_pool="")
        if freeze:
            freeze_early_layers(self.backbone)
        self.num_features = self.backbone.num_features
        self.embed_dim = embed_dim
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(self.num_features, embed_dim), nn.BatchNorm1d(embed_dim), nn.ReLU(inplace=True),
        )
        self.binary_head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(embed_dim, 1))
        self.subtype_head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(embed_dim, num_subtypes))

    def cam_layers(self):
        return [self.backbone.layer4]

    def param_groups(self):
        return split_params(self, self.backbone)

    def forward_features(self, x, mask=None):
        feats = self.backbone(x[:, self.used_mags[0]])
        return self.neck(self.pool(feats).flatten(1))

    def forward_head(self, embedding):
        return self.binary_head(embedding).squeeze(-1), self.subtype_head(embedding)

    def forward(self, x, mask=None):
        embedding = self.forward_features(x, mask)
        binary, subtype = self.forward_head(embedding)
        return dict(binary_logits=binary, subtype_logits=subtype, embedding=embedding,
                    mag_weights=one_hot_weights(x, self.used_mags[0]), hma_weights=None, spatial_maps=None)
