"""Fetch the pretrained weights of the default run's backbones (and any named) into the timm/Hugging Face caches, so
`python main.py` runs offline afterwards: python -m backbones.fetch [BACKBONE ...]."""
import sys
from pathlib import Path

import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache

from config import Config
from utils.helpers import PipelineError

from .encoders import causes, create_backbone, hub_split, is_hub, is_offline

HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def needed(extra=()):
    """The default backbone, the ResNet baseline's and the distillation student's, then `extra`, each once."""
    cfg = Config()
    return list(dict.fromkeys([cfg.backbone, cfg.resnet_backbone, cfg.student_backbone, *extra]))


def pretrained_cfg(name):
    return {} if is_hub(name) else getattr(timm.models.get_pretrained_cfg(name), "__dict__", {})


def hub_repo(name):
    """(repo id, revision) the backbone's weights come from on the hub, or None where timm fetches a URL."""
    if is_hub(name):
        return hub_split(name)
    hub_id = pretrained_cfg(name).get("hf_hub_id")
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def cache_folder(name):
    """Where the backbone's weights are cached: its folder in huggingface_hub's cache, or torch hub's checkpoints."""
    repo = hub_repo(name)
    if repo is None:
        return Path(torch.hub.get_dir()) / "checkpoints"
    return Path(constants.HF_HUB_CACHE) / f"models--{repo[0].replace('/', '--')}"


def is_cached(name):
    repo = hub_repo(name)
    if repo is None:
        url = pretrained_cfg(name).get("url") or ""
        return bool(url) and (cache_folder(name) / Path(url).name).is_file()
    override = pretrained_cfg(name).get("hf_hub_filename")
    files = [override] if override else HUB_FILES
    return any(isinstance(try_to_load_from_cache(repo[0], f, revision=repo[1]), str) for f in files)


def fetch(name):
    """Build the backbone with its pretrained weights (timm and huggingface_hub download and cache them); the line
    saying where they are."""
    cached = is_cached(name)
    create_backbone(name, pretrained=True)
    state = "already cached in" if cached else "downloaded to"
    return f"{name}: weights {state} {cache_folder(name)}"


def cache_only():
    """After the hub proved unreachable: look the remaining backbones up in the cache only (no more retries)."""
    if not constants.HF_HUB_OFFLINE:
        print("[weights] the Hugging Face hub is unreachable: the other backbones are only looked up in the cache", flush=True)
    constants.HF_HUB_OFFLINE = True


def main(argv=None):
    """Fetch every needed backbone; 1 when any could not be fetched (each named with what to do)."""
    failed = 0
    for name in needed(sys.argv[1:] if argv is None else argv):
        try:
            print(f"[weights] {fetch(name)}", flush=True)
        except PipelineError as e:
            failed += 1
            print(f"[weights] WARNING: {e} Or rerun `bash setup.sh` with network to cache them.", flush=True)
            if any(is_offline(c) for c in causes(e)):
                cache_only()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
