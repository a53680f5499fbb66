from .model import MMNet
__all__ = ["MMNet"]
