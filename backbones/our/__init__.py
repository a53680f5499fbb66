from .model import MMNet, create_backbone
__all__ = ["MMNet", "create_backbone"]
