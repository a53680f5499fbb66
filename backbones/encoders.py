"""timm backbones by name (timm models and hf-hub:ORG/NAME), with ImageNet, hub or file weights, input
normalisation from their pretrained config, and feature maps of one stage for CNNs and ViTs alike."""
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import timm
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SwiGLUPacked
from timm.models import get_model_traits

from utils.helpers import PipelineError, log, warn


KNOWN_HUB_KWARGS = {  # timm kwargs from the model cards; the input-size flags come from size_kwargs
    "mahmoodlab/uni": dict(init_values=1e-5),
    "mahmoodlab/uni2-h": dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                              mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked,
                              act_layer=nn.SiLU, reg_tokens=8),
    "bioptimus/h-optimus-0": dict(init_values=1e-5),
    "bioptimus/h-optimus-1": dict(init_values=1e-5),
    "paige-ai/virchow": dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
    "paige-ai/virchow2": dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
}
LUNIT = dict(mean=(0.70322989, 0.53606487, 0.66096631), std=(0.21716536, 0.26081574, 0.20723464),
             licence="lunit-non-commercial")
KAIKO = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), licence="kaiko-non-commercial")
OWKIN = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, licence="owkin-non-commercial")
OPEN_ENCODERS = {  # pathology encoders on the hub that need no token: input mean/std and licence from the model cards
    "1aurent/vit_small_patch8_224.lunit_dino": LUNIT,
    "1aurent/vit_small_patch16_224.lunit_dino": LUNIT,
    "1aurent/vit_small_patch8_224.kaiko_ai_towards_large_pathology_fms": KAIKO,
    "1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms": KAIKO,
    "1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms": KAIKO,
    "1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms": KAIKO,
    "1aurent/vit_base_patch16_224.owkin_pancancer": OWKIN,
}
HUB_NAME = re.compile(r"hf[-_]hub:[\w.-]+/[\w.-]+(@[\w./-]+)?")
SIZE_KWARGS = ("dynamic_img_size", "dynamic_img_pad")
OFFLINE = {"LocalEntryNotFoundError", "ConnectionError", "TimeoutError", "Timeout", "TransportError"}


def create_backbone(name, pretrained=True, pretrained_path="", **kwargs):
    """timm model from a timm name or hf-hub:ORG/NAME, with pretrained weights from the hub, a local file, or random
    init; clear errors otherwise."""
    if not (timm.is_model(name) or is_hub(name)):
        raise PipelineError(f"unknown timm backbone '{name}'. Pick a name from timm.list_models(), e.g. "
                            f"mobilenetv4_conv_small, or a timm model on the Hugging Face hub as hf-hub:ORG/NAME.")
    kwargs = dict(hub_kwargs(name), **kwargs)
    if pretrained_path:
        return from_file(name, Path(pretrained_path), **kwargs)
    if not pretrained:
        return timm_create(offline_name(name), False, **kwargs)
    try:
        return timm_create(name, True, **kwargs)
    except Exception as e:
        raise (hub_error(name, e) if is_hub(name) else imagenet_error(name, e)) from None


def timm_create(name, pretrained, **kwargs):
    """timm.create_model, leaving out the input-size flags an architecture does not take (CNNs, BEiT...)."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        unknown = [k for k in SIZE_KWARGS if k in kwargs and f"'{k}'" in str(e)]
        if not unknown:
            raise
        kwargs.pop(unknown[0])
        return timm_create(name, pretrained, **kwargs)


def imagenet_error(name, e):
    return PipelineError(
        f"could not load ImageNet weights for backbone '{name}' ({type(e).__name__}: {str(e)[:200]}). "
        f"Either train from random init with --no-pretrained, or download the timm weights for '{name}' "
        f"on a machine with network and pass --pretrained-path FILE (config field pretrained_path)."
    )


def is_hub(name):
    return HUB_NAME.fullmatch(name) is not None


def hub_split(name):
    """(ORG/NAME, revision or None) of an hf-hub: backbone name."""
    repo, _, revision = name.split(":", 1)[1].partition("@")
    return repo, revision or None


def hub_kwargs(name):
    return KNOWN_HUB_KWARGS.get(hub_split(name)[0].lower(), {}) if is_hub(name) else {}


def open_encoder(name):
    """Model-card settings of an open pathology encoder (mean, std, licence), or None for any other backbone."""
    return OPEN_ENCODERS.get(hub_split(name)[0].lower()) if is_hub(name) else None


@lru_cache(maxsize=None)
def is_cnn(name):
    """True for a timm convolutional network; False for ViTs (a patch embedding), hub models and unknown names."""
    if is_hub(name) or not timm.is_model(name):
        return False
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return False
    return not hasattr(model, "patch_embed")


FROZEN_CNN_STAGE = (2,)


def frozen_stage(name):
    """The backbone stage(s) a frozen encoder is read at: a middle stage of a CNN (its last transfers worst from
    ImageNet to histology, docs/encoders.md), the last of a ViT or hub encoder."""
    return FROZEN_CNN_STAGE if is_cnn(name) else (-1,)


def hub_config_file(name):
    """Local path of an hf-hub: backbone's config.json: huggingface_hub's cache, else downloaded once."""
    repo, revision = hub_split(name)
    path = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(path, str):
        return path
    try:
        return hf_hub_download(repo, "config.json", revision=revision)
    except Exception as e:
        raise hub_error(name, e) from None


def offline_name(name):
    """The name timm builds from without hub weights: an hf-hub: name as its local config folder (no network)."""
    return f"local-dir:{Path(hub_config_file(name)).parent}" if is_hub(name) else name


def causes(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def is_refusal(e):
    status = getattr(getattr(e, "response", None), "status_code", None)
    return isinstance(e, (GatedRepoError, RepositoryNotFoundError)) or status in (401, 403)


def is_offline(e):
    return any(c.__name__ in OFFLINE for c in type(e).__mro__)


def hub_error(name, e):
    """PipelineError for an hf-hub: backbone the hub refused or could not deliver, naming the model page and fixes."""
    repo, _ = hub_split(name)
    page = f"https://huggingface.co/{repo}"
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    cause = f"{type(e).__name__}: {str(e)[:200]}"
    if open_encoder(name) is not None and not any(is_refusal(c) for c in causes(e)):
        return PipelineError(f"could not fetch backbone '{name}' from the Hugging Face hub ({cause}). It needs no "
                             f"token: connect to the network once (the weights are then cached), or download the "
                             f"weights and config.json from {page} and pass --pretrained-path FILE.")
    fixes = (f"Open {page}, log in and accept the model's licence, create a read token at "
             f"https://huggingface.co/settings/tokens and `export HF_TOKEN=hf_...`, then run again; or download the "
             f"weights where you have access and pass --pretrained-path FILE (the model's config.json is still needed "
             f"once: `hf download {repo} config.json`).")
    if any(is_refusal(c) for c in causes(e)):
        return PipelineError(f"the Hugging Face hub refused backbone '{name}' ({cause}); {token}. The model is gated "
                             f"or private (or the name is wrong). {fixes}")
    if any(is_offline(c) for c in causes(e)):
        return PipelineError(f"could not reach the Hugging Face hub for backbone '{name}' and it is not in the local "
                             f"cache ({cause}); {token}. Connect to the network, or: {fixes}")
    return PipelineError(f"could not build backbone '{name}' from the Hugging Face hub ({cause}). Its model card at "
                         f"{page} may list timm settings this pipeline does not pass (KNOWN_HUB_KWARGS in "
                         f"backbones/common.py).")


def from_file(name, path, **kwargs):
    """timm model with weights from a local file, checked to have arrived: timm skips names it does not know."""
    if not path.is_file():
        raise PipelineError(f"--pretrained-path {path} does not exist (weights file for backbone '{name}').")
    source = offline_name(name)
    try:
        net = timm_create(source, True, pretrained_cfg_overlay=dict(file=str(path), source=""), **kwargs)
        share = loaded_share(net, timm.models.load_state_dict(str(path)))
    except (RuntimeError, KeyError, ValueError, OSError, AssertionError) as e:
        raise PipelineError(f"--pretrained-path {path} is not a weights file for backbone '{name}' "
                            f"({type(e).__name__}: {str(e)[:200]}).") from None
    if share < 0.5:
        raise PipelineError(f"--pretrained-path {path} is not a weights file for backbone '{name}': only {share:.0%} "
                            f"of its weight tensors are in the file. Pass the file made for '{name}'.")
    if share < 1:
        warn(f"--pretrained-path {path}: {share:.0%} of backbone '{name}' weight tensors found in the file; the rest "
             f"keep their random init")
    norm = normalization(name)
    log(f"backbone {name}: weights from {path}; inputs normalised with mean {norm['mean']} std {norm['std']} "
        f"(the pretrained config of {name})")
    return net


def loaded_share(net, state):
    """Share of the network's float tensors equal (by shape and checksum) to one in the state dict."""
    def key(t):
        return tuple(t.shape), float(t.double().sum()), float(t.double().abs().sum())
    have = {key(t) for t in state.values() if torch.is_tensor(t) and t.is_floating_point()}
    mine = [key(t) for t in net.state_dict().values() if t.is_floating_point()]
    return sum(k in have for k in mine) / max(1, len(mine))


def normalization(name):
    """Input mean and std of the backbone's pretrained config (timm's, or an hf-hub model's config.json); ImageNet's
    where it has none; an open pathology encoder's come from its model card."""
    known = open_encoder(name)
    if known is not None:
        return dict(mean=[float(v) for v in known["mean"]], std=[float(v) for v in known["std"]])
    cfg = hub_pretrained_cfg(name) if is_hub(name) else getattr(timm.models.get_pretrained_cfg(name), "__dict__", {})
    if cfg.get("mean") is None or cfg.get("std") is None:
        if is_hub(name):
            warn(f"backbone {name}: its config.json gives no mean/std; inputs are normalised with ImageNet's")
        cfg = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return dict(mean=[float(v) for v in cfg["mean"]], std=[float(v) for v in cfg["std"]])


def hub_pretrained_cfg(name):
    """The pretrained config in an hf-hub: model's config.json (older exports keep it at the top level)."""
    cfg = json.loads(Path(hub_config_file(name)).read_text())
    return cfg.get("pretrained_cfg", cfg)


def feature_backbone(cfg):
    """The config's backbone (timm name or hf-hub:ORG/NAME, CNN or ViT) giving the NCHW feature maps of the stages
    `cfg.feature_stage` (-1: the last), shallow to deep; ViTs take any image size where timm allows it."""
    net = feature_net(cfg)
    if getattr(net, "output_fmt", "NCHW") == "NHWC":
        net = feature_net(cfg, feature_cls="getter")
    n_stages = len(net.feature_info.info)
    if len({k % n_stages for k in cfg.feature_stage}) != len(cfg.feature_stage):
        stages = ",".join(map(str, cfg.feature_stage))
        raise PipelineError(f"--feature-stage {stages} names one stage of backbone '{cfg.backbone}' twice (it has "
                            f"{n_stages} stages; -1 is the last). Name each stage once.")
    traits = get_model_traits(net)
    if traits.get("fixed_input_size") and traits.get("img_size"):
        warn_fixed_size(cfg.backbone, tuple(traits["img_size"]))
    return cut_after_last_stage(net)


def cut_after_last_stage(net):
    """Drop the blocks after the deepest selected stage (timm's EfficientNet/MobileNet feature nets keep and run them;
    its other feature nets drop them already), so a middle-stage backbone trains, counts and runs only what it uses."""
    blocks, stages = getattr(net, "blocks", None), getattr(net, "_stage_out_idx", None)
    if not isinstance(blocks, nn.Sequential) or not stages or getattr(net, "feature_hooks", None) is not None:
        return net
    keep = max(stages)
    if keep >= len(blocks):
        return net
    net.blocks = blocks[:keep]
    return net


def feature_net(cfg, **kwargs):
    return create_backbone(cfg.backbone, cfg.pretrained, cfg.pretrained_path, features_only=True,
                           out_indices=tuple(cfg.feature_stage), **size_kwargs(cfg.backbone), **kwargs)


def size_kwargs(name):
    """dynamic_img_size/pad for backbones timm builds for one input size (ViTs; hf-hub models may be ViTs)."""
    cfg = None if is_hub(name) else timm.models.get_pretrained_cfg(name)
    fixed = is_hub(name) or (cfg is not None and cfg.fixed_input_size)
    return dict.fromkeys(SIZE_KWARGS, True) if fixed else {}


@lru_cache(maxsize=None)
def warn_fixed_size(name, size):
    warn(f"backbone {name} takes {size[0]}x{size[1]} px inputs only (timm builds it without a dynamic image size): "
         f"run with --image-size {size[0]}; other sizes may fail")
