"""Model registry: name -> model class, every class built from one ModelConfig over the full magnification tuple."""
from dataclasses import asdict

from utils.helpers import PipelineError

from .baseline_resnet50 import ResNet50Transfer
from .baseline_simple_concat import SimpleConcat
from .baseline_single import SingleMag
from .common import ModelConfig, config_from, create_backbone
from .our import MMNet

MODELS = {cls.name: cls for cls in (MMNet, SimpleConcat, SingleMag, ResNet50Transfer)}
REFERENCE_MODEL = MMNet.name

__all__ = ["MODELS", "REFERENCE_MODEL", "ModelConfig", "build_model", "create_backbone", "list_models",
           "model_config", "model_kwargs_of"]


def list_models():
    return list(MODELS)


def model_class(name):
    if name not in MODELS:
        raise PipelineError(f"unknown model '{name}'. Valid models: {', '.join(MODELS)}")
    return MODELS[name]


def model_config(name, **kwargs):
    """ModelConfig for a registered model: its defaults under the given settings."""
    return config_from(model_class(name).defaults, kwargs)


def build_model(name, cfg=None, **kwargs):
    """Build a registered model from keyword settings (checkpoint `model_kwargs`), a ModelConfig, or both."""
    cls = model_class(name)
    return cls(config_from(cls.defaults if cfg is None else asdict(cfg), kwargs))


def model_kwargs_of(model):
    """The settings dict that rebuilds `model` through build_model(model.name, **kwargs)."""
    return asdict(model.cfg)
