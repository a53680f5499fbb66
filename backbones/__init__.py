"""Model registry: name -> model class, every class built from one ModelConfig over the full magnification tuple;
model_config is the one place a model's settings are taken from the run's Config."""
from dataclasses import asdict

from utils.helpers import PipelineError

from .baseline_probe import LinearProbe
from .baseline_resnet50 import ResNet50Transfer
from .baseline_simple_concat import SimpleConcat
from .baseline_single import SingleMag
from .common import MagnificationModel, ModelConfig, config_from, create_backbone
from .our import MMNet

MODELS = {cls.name: cls for cls in (MMNet, SimpleConcat, SingleMag, ResNet50Transfer, LinearProbe)}
REFERENCE_MODEL = MMNet.name

__all__ = ["MODELS", "REFERENCE_MODEL", "ModelConfig", "build_model", "create_backbone", "list_models",
           "magnifications_read", "model_config"]


def list_models():
    return list(MODELS)


def model_class(name):
    if name not in MODELS:
        raise PipelineError(f"unknown model '{name}'. Valid models: {', '.join(MODELS)}")
    return MODELS[name]


def model_config(cfg, name, num_subtypes, **flags):
    """ModelConfig of model `name` for a run with settings `cfg`: the main backbone and its weights, stage(s), dropout
    and magnifications, then the run's own flags. A run on a backbone of its own (ResNet50, the student) takes that
    backbone's hub weights and last stage."""
    settings = dict(magnifications=tuple(cfg.magnifications), num_subtypes=num_subtypes, backbone=cfg.backbone,
                    pretrained=cfg.pretrained, pretrained_path=cfg.pretrained_path, drop_rate=cfg.drop_rate,
                    feature_stage=tuple(cfg.feature_stage), shared_backbone=cfg.shared_backbone)
    if flags.get("backbone", cfg.backbone) != cfg.backbone:
        settings.update(pretrained_path="", feature_stage=(-1,))
    defaults = MODELS[name].defaults if name in MODELS else {}
    return config_from(defaults, {**settings, **flags})


def magnifications_read(name, settings):
    """The magnifications model `name` reads images of under `settings` (a ModelConfig or its dict): its slots'
    magnifications, each once ('any' for the magnification-independent classifier)."""
    settings = settings if isinstance(settings, ModelConfig) else config_from({}, settings)
    return MODELS.get(name, MagnificationModel).reads(settings)


def build_model(name, cfg=None, **kwargs):
    """Build a registered model from keyword settings (checkpoint `model_kwargs`), a ModelConfig, or both."""
    cls = model_class(name)
    return cls(config_from(cls.defaults if cfg is None else asdict(cfg), kwargs))

