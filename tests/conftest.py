import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import MAGNIFICATIONS, Config  # noqa: E402

torch.set_num_threads(1)

SAMPLES = ROOT.parent / "shared" / "data" / "breakhis_samples"
TEST_SETTINGS = dict(
    synthetic=True, pretrained=False, backbone="test_efficientnet", image_size=32, subtype_min_images=10,
    epochs=2, batch_size=8, tuples_per_patient=4, warmup_epochs=1, patience=5, bootstrap=50,
    amp=False, lr=2e-3, resnet_backbone="test_resnet",
)

MODEL_BASE = dict(magnifications=MAGNIFICATIONS, num_subtypes=8, backbone="test_efficientnet", pretrained=False,
                  pretrained_path="", drop_rate=0.3, feature_stage=(-1,), shared_backbone=True)


def model_settings(**settings):
    """Every run-level model setting (backbones.model_config takes them from Config in the pipeline), overridden."""
    return dict(MODEL_BASE, **settings)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A tiny, clearly learnable (easy) synthetic BreakHis tree in the tarball layout, built once per session."""
    from preprocess.synthetic import make_synthetic
    root = tmp_path_factory.mktemp("breakhis")
    make_synthetic(root, preset="tiny", seed=0, difficulty="easy")
    return root


@pytest.fixture
def make_cfg(tmp_path, tiny_root):
    """Config for tests: the tiny tree, a fresh output folder, a tiny backbone and small images."""
    def make(**overrides):
        settings = dict(TEST_SETTINGS, data_root=str(tiny_root), output_dir=str(tmp_path / "output"))
        return replace(Config(), **dict(settings, **overrides))
    return make


def same_normalisation(actual, expected, tol=1e-6):
    """Mean and std lists equal within tol (pytest.approx refuses nested dictionaries)."""
    return actual.keys() == expected.keys() and all(actual[k] == pytest.approx(expected[k], abs=tol) for k in expected)


def prepared_output(tmp_path_factory, tiny_root, name, **overrides):
    """Config on the tiny tree with its index and splits written once into a fresh output folder."""
    from preprocess.analyze import run_analyze
    from preprocess.preprocess import run_split
    out = tmp_path_factory.mktemp(name) / "output"
    cfg = replace(Config(), **dict(TEST_SETTINGS, data_root=str(tiny_root), output_dir=str(out), **overrides))
    run_analyze(cfg)
    run_split(cfg)
    return cfg


@pytest.fixture(scope="session")
def fixed_output(tmp_path_factory, tiny_root):
    """An output folder with the index, the splits and a 1-epoch reference model on the fixed split, built once;
    tests copy it (copy_output) before writing into it."""
    import main
    from tests.test_pipeline import flags
    out = tmp_path_factory.mktemp("fixed") / "output"
    cfg = replace(Config(), **dict(TEST_SETTINGS, data_root=str(tiny_root), output_dir=str(out), epochs=1))
    assert main.main(flags(cfg, "analyze,split,fixed")) == 0
    return cfg


def copy_output(cfg, target):
    """A private copy of a prepared output folder (its cache included) and the config pointing at it."""
    import shutil
    shutil.copytree(cfg.output_dir, target)
    return replace(cfg, output_dir=str(target))
