"""Model registry: name -> constructor, all taking the full magnification tuple."""
from utils.helpers import PipelineError

from .baseline_resnet50 import ResNet50Transfer
from .baseline_simple_concat import SimpleConcat
from .baseline_single import SingleMag
from .our import MMNet

MODELS = {
    "mmnet": MMNet,
    "simple_concat": SimpleConcat,
    "single_mag": SingleMag,
    "resnet50_transfer": ResNet50Transfer,
}


def list_models():
    return list(MODELS)


def build_model(name, **kwargs):
    """Build a registered model; unknown names list the valid ones."""
    if name not in MODELS:
        raise PipelineError(f"unknown model '{name}'. Valid models: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
