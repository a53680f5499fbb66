"""Pretrained weights offline: a filled hub cache builds the models with its weights under HF_HUB_OFFLINE, an empty
one gives the clear error, backbones.fetch says what is cached, and main.py trains offline from the cache."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from backbones import REFERENCE_MODEL, build_model
from backbones import fetch
from tests.conftest import model_settings
from utils.helpers import PipelineError

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_weights(name, seed=7):
    """A timm model's state dict with non-default values everywhere."""
    torch.manual_seed(seed)
    state = timm.create_model(name).state_dict()
    return {k: t + torch.randn_like(t) * 0.1 if t.is_floating_point() else t.clone() for k, t in state.items()}


def fill_cache(cache, name, state):
    """huggingface_hub's cache layout for the hub repo timm loads `name` from: refs/main naming a snapshot holding
    model.safetensors."""
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "snapshots" / COMMIT).mkdir(parents=True)
    save_file({k: t.contiguous() for k, t in state.items()}, str(folder / "snapshots" / COMMIT / "model.safetensors"))
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty hub cache, read as under HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_filled_cache_builds_the_model_offline_with_its_weights(offline):
    source = hub_weights("test_efficientnet")
    fill_cache(offline, "test_efficientnet", source)
    model = build_model(REFERENCE_MODEL, **model_settings(pretrained=True, num_subtypes=3))
    backbone = model.backbones[0].state_dict()
    shared = [k for k in backbone if k in source and backbone[k].is_floating_point()]
    assert len(shared) > 20
    assert all(torch.equal(backbone[k], source[k]) for k in shared)


def test_an_empty_cache_offline_is_the_clear_error(offline):
    with pytest.raises(PipelineError, match="ImageNet weights for backbone 'test_efficientnet'.*--no-pretrained"):
        build_model(REFERENCE_MODEL, **model_settings(pretrained=True, num_subtypes=3))


def test_fetch_says_what_is_cached_and_fails_for_the_rest(offline, capsys):
    folder = fill_cache(offline, "test_efficientnet", hub_weights("test_efficientnet"))
    assert fetch.needed(["test_efficientnet", "resnet50"]) == [
        "mobilenetv4_conv_small", "resnet50", "mobilenetv3_small_050", "test_efficientnet"]
    assert fetch.main(["test_efficientnet"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"[weights] test_efficientnet: weights already cached in {folder}"
    missing = [line for line in lines if "WARNING" in line]
    for name, line in zip(("mobilenetv4_conv_small", "resnet50", "mobilenetv3_small_050"), missing, strict=True):
        assert f"backbone '{name}'" in line and "--pretrained-path FILE" in line and "setup.sh" in line


def main_py(tiny_root, out, cache):
    """main.py offline (HF_HUB_OFFLINE=1 on the hub cache `cache`) training MMNet and the ResNet baseline pretrained."""
    argv = ["--data-root", str(tiny_root), "--output-dir", str(out), "--stages", "analyze,split,fixed,baselines",
            "--runs", "mmnet,resnet50_transfer_40X", "--folds", "0", "--synthetic", "--backbone", "test_efficientnet",
            "--resnet-backbone", "test_resnet", "--image-size", "32", "--subtype-min-images", "10", "--epochs", "1",
            "--batch-size", "8", "--tuples-per-patient", "4", "--warmup-epochs", "1", "--bootstrap", "20",
            "--no-amp", "--jobs", "1", "--no-tensorboard"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent),
               TORCH_HOME=str(cache.parent / "torch"), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROOT)
    return run.returncode, run.stdout + run.stderr


def test_main_runs_offline_from_the_filled_cache(tiny_root, tmp_path):
    cache = tmp_path / "hub"
    fill_cache(cache, "test_efficientnet", hub_weights("test_efficientnet"))
    fill_cache(cache, "test_resnet", hub_weights("test_resnet"))
    code, text = main_py(tiny_root, tmp_path / "output", cache)
    assert code == 0, text[-3000:]
    assert "skipped" not in text
    for run in ("mmnet/fixed", "resnet50_transfer_40X/fold_0"):
        assert (tmp_path / "output" / "runs" / run / "metrics.json").is_file(), run


def test_main_offline_without_the_weights_stops_with_the_clear_error(tiny_root, tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    code, text = main_py(tiny_root, tmp_path / "output", cache)
    assert code == 2
    assert "could not load ImageNet weights for backbone 'test_efficientnet'" in text and "--no-pretrained" in text
