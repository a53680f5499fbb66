"""The pretrained path: weights through --pretrained-path, checked arrival, the backbone's normalisation, LR scale."""
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

import main
from backbones import REFERENCE_MODEL, build_model, model_config
from backbones.common import normalization
from config import Config
from stages.training.checkpoint import checkpoint
from stages.training.forward import predict
from preprocess.tuples import ImageBank
from stages.training.train import build_optimizer
from tests.conftest import model_settings, same_normalisation
from utils.helpers import PipelineError

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
HALF = dict(mean=[0.5] * 3, std=[0.5] * 3)


@pytest.fixture
def weights(tmp_path):
    """A state dict of test_efficientnet with non-default values everywhere, saved as a file."""
    torch.manual_seed(7)
    net = timm.create_model("test_efficientnet")
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def flag_config(*argv):
    return main.resolve_config(["--backbone", "test_efficientnet", *argv])


def test_weights_arrive_through_the_flag(weights):
    path, source = weights
    cfg = flag_config("--pretrained-path", str(path))
    model = build_model(REFERENCE_MODEL, **asdict(model_config(cfg, REFERENCE_MODEL, 3)))
    backbone = model.backbones[0].state_dict()
    shared = [k for k in backbone if k in source and backbone[k].is_floating_point()]
    assert len(shared) > 20
    assert all(torch.equal(backbone[k], source[k]) for k in shared)


def test_random_init_does_not_match_the_file(weights):
    path, source = weights
    model = build_model(REFERENCE_MODEL, **asdict(model_config(flag_config("--no-pretrained"), REFERENCE_MODEL, 3)))
    assert not torch.equal(model.backbones[0].conv_stem.weight, source["conv_stem.weight"])


def test_a_file_for_another_backbone_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(PipelineError, match="not a weights file for backbone 'test_efficientnet'"):
        build_model(REFERENCE_MODEL, **model_settings(pretrained_path=str(path), num_subtypes=3))


def test_a_partial_file_loads_with_a_warning(weights, tmp_path, monkeypatch):
    path, source = weights
    warnings = []
    monkeypatch.setattr("backbones.encoders.warn", warnings.append)
    keys = list(source)
    partial = {k: v for k, v in source.items() if k not in keys[-len(keys) // 4:]}
    torch.save(partial, tmp_path / "partial.pth")
    model = build_model(REFERENCE_MODEL, **model_settings(pretrained_path=str(tmp_path / "partial.pth"), num_subtypes=3))
    assert torch.equal(model.backbones[0].conv_stem.weight, source["conv_stem.weight"])
    assert len(warnings) == 1 and "keep their random init" in warnings[0]


def test_normalisation_follows_the_backbone_into_the_checkpoint():
    assert same_normalisation(normalization("test_efficientnet"), IMAGENET)
    assert same_normalisation(normalization("test_resnet"), HALF)
    cfg = Config()
    for backbone, expected in (("test_efficientnet", IMAGENET), ("test_resnet", HALF)):
        kwargs = model_settings(backbone=backbone, num_subtypes=2, magnifications=("40X",))
        model = build_model("single_mag", **kwargs)
        meta = SimpleNamespace(model_name="single_mag", model_kwargs=kwargs, classes=["a", "b"],
                               bank=SimpleNamespace(shape=(32, 48)))
        assert same_normalisation(checkpoint(model, meta, cfg, 1, 0.5)["normalization"], expected)


class Probe(torch.nn.Module):
    """Records its input; outputs what predict reads."""

    def __init__(self, norm):
        super().__init__()
        self.normalization = norm
        self.seen = []

    def forward(self, x, mask):
        self.seen.append(x)
        n = len(x)
        return dict(binary_logits=torch.zeros(n), subtype_logits=torch.zeros(n, 2), embedding=None,
                    mag_weights=None, hma_weights=None)


class Bank:
    """One white image in the first of two magnification slots."""

    batch = ImageBank.batch

    def gather(self, rows, device):
        images = torch.zeros(len(rows), 2, 4, 4, 3, dtype=torch.uint8)
        images[:, 0] = 255
        return images, torch.tensor([[True, False]] * len(rows))


@pytest.mark.parametrize("norm", [IMAGENET, HALF])
def test_prediction_normalises_with_the_models_statistics(norm):
    probe = Probe(norm)
    predict(probe, Bank(), [([0, 1], [0, 1], [0, 0])], torch.device("cpu"))
    white = probe.seen[0][:, 0, :, 0, 0]
    expected = (1 - np.array(norm["mean"])) / np.array(norm["std"])
    assert white.numpy() == pytest.approx(np.tile(expected, (2, 1)), abs=1e-5)
    assert probe.seen[0][:, 1].abs().max() == 0


def backbone_lrs(cfg):
    model = build_model(REFERENCE_MODEL, **model_settings(num_subtypes=3))
    return sorted({g["lr"] for g in build_optimizer(model, cfg, torch.device("cpu")).param_groups})


def test_pretrained_file_gets_the_lower_backbone_learning_rate(weights):
    cfg = replace(Config(), lr=1e-3, backbone_lr_scale=0.1)
    assert backbone_lrs(replace(cfg, pretrained=False, pretrained_path=str(weights[0]))) == pytest.approx([1e-4, 1e-3])
    assert backbone_lrs(replace(cfg, pretrained=False)) == pytest.approx([1e-3])
