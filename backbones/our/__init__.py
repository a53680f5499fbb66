from .model import MMNet, create_backbone
