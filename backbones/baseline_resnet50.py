"""ResNet50 ImageNet-transfer baseline on one magnification, with progressive unfreezing."""
import torch.nn as nn

from utils.helpers import PipelineError

from .common import SingleMagnificationModel, create_backbone

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


class ResNet50Transfer(SingleMagnificationModel):
    """ResNet50 (timm) -> Dropout(0.5)-Linear(2048,512)-BN-ReLU embedding -> Dropout binary and subtype heads."""

    name = "resnet50_transfer"
    defaults = dict(embed_dim=512)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.backbone = create_backbone(cfg.backbone, cfg.pretrained, cfg.pretrained_path, num_classes=0, global_pool="")
        if cfg.freeze:
            freeze_early_layers(self.backbone)
        self.num_features = self.backbone.num_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        dim = cfg.embed_dim
        self.neck = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(self.num_features, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        )
        self.init_heads(dim)

    def embed(self, images):
        feats = self.feature_tap(self.backbone(images))
        return self.neck(self.pool(feats).flatten(1))
