"""Any timm backbone in the pipeline: ViTs at any image size, channels-last nets, feature stages, hf-hub names with
their cached config, and gated or unreachable hub models stopping with a clear message. CPU, no network."""
import json

import huggingface_hub.constants
import pytest
import timm
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import main

import backbones.encoders as common
from backbones import build_model
from backbones.common import ModelConfig
from backbones.encoders import OPEN_ENCODERS, create_backbone, feature_backbone, hub_kwargs, normalization
from tests.conftest import model_settings, same_normalisation
from utils.checks import check_field
from utils.helpers import PipelineError

MAGS2 = ("40X", "100X")

try:
    import httpx2 as httpx  # huggingface_hub >= 2 (older releases use httpx)
except ImportError:
    import httpx

VIT = "vit_tiny_patch16_224"
CNN = "mobilenetv3_small_050"
HUB = "hf-hub:test-org/tiny-vit"
GATED = "hf-hub:test-org/gated"
PAGE = "https://huggingface.co/test-org/gated"
HUB_MEAN, HUB_STD = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
LUNIT = "hf-hub:1aurent/vit_small_patch8_224.lunit_dino"
LUNIT_MEAN, LUNIT_STD = [0.70322989, 0.53606487, 0.66096631], [0.21716536, 0.26081574, 0.20723464]


def backbone(name, **kwargs):
    return feature_backbone(ModelConfig(**model_settings(backbone=name, pretrained=False, **kwargs)))


def batch(size, b=2, m=2):
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[1, 1] = False
    return torch.randn(b, m, 3, size, size), mask


def response(status):
    url = "https://huggingface.co/test-org/gated/resolve/main/config.json"
    return httpx.Response(status, request=httpx.Request("GET", url))


def cache_config(root, repo, mean, std):
    """config.json of a vit_tiny_patch16_224 export as `repo` in a Hugging Face cache under root."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    pretrained_cfg = dict(mean=mean, std=std, input_size=[3, 224, 224], fixed_input_size=True)
    (snapshot / "config.json").write_text(json.dumps(dict(architecture=VIT, num_classes=0,
                                                          pretrained_cfg=pretrained_cfg)))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding config.json of HUB and of the open LUNIT encoder (vit_tiny_patch16_224 exports,
    the LUNIT one with ImageNet's mean/std); the hub itself is offline."""
    cache_config(tmp_path, "test-org/tiny-vit", HUB_MEAN, HUB_STD)
    cache_config(tmp_path, LUNIT.split(":", 1)[1], list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.mark.parametrize("size", [32, 64])
def test_a_vit_gives_nchw_maps_at_any_image_size(size):
    net = backbone(VIT)
    maps = net(torch.randn(2, 3, size, size))[-1]
    assert maps.shape == (2, 192, size // 16, size // 16)
    assert net.feature_info.channels()[-1] == 192


def test_a_cnn_is_built_as_before():
    net = backbone(CNN)
    plain = timm.create_model(CNN, features_only=True, out_indices=(-1,))
    assert type(net) is type(plain) and list(net.state_dict()) == list(plain.state_dict())
    assert net(torch.randn(2, 3, 64, 64))[-1].shape == (2, net.feature_info.channels()[-1], 2, 2)


def test_channels_last_backbones_give_nchw_maps():
    net = backbone("test_mambaout")
    maps = net(torch.randn(2, 3, 64, 64))[-1]
    assert maps.shape[1] == net.feature_info.channels()[-1]
    assert maps.shape[2] == maps.shape[3] < maps.shape[1]


def test_feature_stage_picks_a_middle_stage_of_a_cnn():
    last, middle = backbone(CNN), backbone(CNN, feature_stage=(2,))
    x = torch.randn(2, 3, 64, 64)
    assert middle.feature_info.channels()[-1] != last.feature_info.channels()[-1]
    assert middle(x)[-1].shape[1] == middle.feature_info.channels()[-1]
    assert middle(x)[-1].shape[-1] > last(x)[-1].shape[-1]


def test_a_fixed_size_vit_says_which_image_size_it_takes(monkeypatch):
    warnings = []
    monkeypatch.setattr(common, "warn", warnings.append)
    common.warn_fixed_size.cache_clear()
    net = backbone("test_vit_relpos")
    assert net(torch.randn(1, 3, 160, 160))[-1].shape[0] == 1
    assert len(warnings) == 1 and "--image-size 160" in warnings[0]


def test_a_register_token_vit_with_patch_14_pads_odd_sizes():
    kwargs = dict(hub_kwargs("hf-hub:MahmoodLab/UNI2-h"), depth=2, embed_dim=48, num_heads=2)
    assert kwargs["reg_tokens"] == 8
    net = create_backbone("vit_giant_patch14_224", False, features_only=True, out_indices=(-1,),
                          dynamic_img_size=True, dynamic_img_pad=True, **kwargs)
    assert net(torch.randn(2, 3, 64, 64))[-1].shape == (2, 48, 5, 5)


def test_mmnet_with_a_vit_trains_at_32_px():
    model = build_model("mmnet", **model_settings(magnifications=MAGS2, num_subtypes=3, backbone=VIT, pretrained=False))
    out = model(*batch(32))
    assert out["binary_logits"].shape == (2,)
    assert out["spatial_maps"].shape == (2, 2, 2, 2)
    (out["binary_logits"].sum() + out["subtype_logits"].sum()).backward()
    assert model.backbones[0].model.blocks[0].attn.qkv.weight.grad is not None
    assert model.normalization == dict(mean=[0.5] * 3, std=[0.5] * 3)


@pytest.mark.parametrize("name", ["simple_concat", "single_mag"])
def test_baselines_with_a_vit_train_at_32_px(name):
    slots = MAGS2[:1] if name == "single_mag" else MAGS2
    model = build_model(name, **model_settings(magnifications=slots, num_subtypes=3, backbone=VIT, pretrained=False))
    out = model(*batch(32))
    assert out["binary_logits"].shape == (2,)
    out["binary_logits"].sum().backward()
    assert any(p.grad is not None for p in model.backbone_parameters())


def test_hub_names_pass_the_config_check():
    check_field("backbone", "hf-hub:MahmoodLab/UNI2-h")
    check_field("backbone", "hf-hub:bioptimus/H-optimus-0")
    for bad in ("hf-hub:no-org", "no_such_backbone"):
        with pytest.raises(PipelineError, match="--backbone"):
            check_field("backbone", bad)


def test_an_unknown_backbone_is_named():
    with pytest.raises(PipelineError, match="unknown timm backbone 'no_such_net'.*hf-hub:ORG/NAME"):
        create_backbone("no_such_net")


def gated(*args, **kwargs):
    raise GatedRepoError("401 Client Error. Cannot access gated repo", response=response(401))


def test_a_gated_model_without_token_names_the_page_and_the_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(timm, "create_model", gated)
    with pytest.raises(PipelineError) as e:
        feature_backbone(ModelConfig(**model_settings(backbone=GATED, pretrained=True)))
    message = str(e.value)
    for part in (PAGE, "licence", "HF_TOKEN is not set", "export HF_TOKEN=", "--pretrained-path FILE"):
        assert part in message


def test_a_token_without_access_is_reported_but_never_printed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")

    def forbidden(*args, **kwargs):
        raise HfHubHTTPError("403 Forbidden", response=response(403))
    monkeypatch.setattr(timm, "create_model", forbidden)
    with pytest.raises(PipelineError, match="refused") as e:
        feature_backbone(ModelConfig(**model_settings(backbone=GATED, pretrained=True)))
    assert "HF_TOKEN is set" in str(e.value) and PAGE in str(e.value)
    assert "hf_secret_value" not in str(e.value)


@pytest.mark.parametrize("error", [LocalEntryNotFoundError("not in the cache"), httpx.ConnectError("no route"),
                                   ConnectionError("network is unreachable")])
def test_no_network_names_the_page_and_the_offline_way(monkeypatch, error):
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def offline(*args, **kwargs):
        raise error
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PipelineError, match="could not reach the Hugging Face hub") as e:
        feature_backbone(ModelConfig(**model_settings(backbone=GATED, pretrained=True)))
    assert PAGE in str(e.value) and "--pretrained-path FILE" in str(e.value)


def test_a_gated_config_stops_the_model_build(monkeypatch, hub_cache):
    monkeypatch.setattr(common, "hf_hub_download", gated)
    with pytest.raises(PipelineError, match="refused.*https://huggingface.co/test-org/gated"):
        build_model("mmnet", **model_settings(magnifications=MAGS2, num_subtypes=3, backbone=GATED, pretrained=True))


def test_hub_normalisation_comes_from_the_cached_config(hub_cache):
    assert same_normalisation(normalization(HUB), dict(mean=HUB_MEAN, std=HUB_STD))


def test_a_hub_model_builds_from_its_cached_config_without_network(hub_cache):
    model = build_model("mmnet", **model_settings(magnifications=MAGS2, num_subtypes=3, backbone=HUB, pretrained=False))
    assert same_normalisation(model.normalization, dict(mean=HUB_MEAN, std=HUB_STD))
    assert model(*batch(32))["binary_logits"].shape == (2,)


def test_hub_weights_arrive_through_pretrained_path(hub_cache, tmp_path):
    torch.manual_seed(3)
    source = timm.create_model(VIT, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = build_model("mmnet", **model_settings(magnifications=MAGS2, num_subtypes=3, backbone=HUB,
                        pretrained_path=str(tmp_path / "weights.pth"), pretrained=True))
    net = model.backbones[0].model
    assert torch.equal(net.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert torch.equal(net.pos_embed, source.pos_embed)
    assert model(*batch(64))["binary_logits"].shape == (2,)


def test_an_open_encoder_takes_its_model_card_mean_and_std_offline(hub_cache):
    assert normalization(LUNIT)["mean"] == pytest.approx(LUNIT_MEAN)
    assert normalization(LUNIT)["std"] == pytest.approx(LUNIT_STD)
    model = build_model("mmnet", **model_settings(magnifications=MAGS2, num_subtypes=3, backbone=LUNIT))
    assert model.normalization["mean"] == pytest.approx(LUNIT_MEAN)
    assert model(*batch(32))["binary_logits"].shape == (2,)


def test_every_open_encoder_has_a_card_normalisation_and_a_licence():
    assert len(OPEN_ENCODERS) >= 5
    for repo, card in OPEN_ENCODERS.items():
        check_field("backbone", f"hf-hub:{repo}")
        assert len(card["mean"]) == len(card["std"]) == 3 and all(0 < v < 1 for v in (*card["mean"], *card["std"]))
        assert card["licence"]


def test_an_open_encoder_trains_frozen_unless_asked_to_fine_tune(caplog):
    import logging
    with caplog.at_level(logging.INFO):
        cfg = main.resolve_config(["--backbone", LUNIT])
    assert cfg.freeze_backbone and "--no-freeze-backbone to fine-tune" in caplog.text
    assert not main.resolve_config(["--backbone", LUNIT, "--no-freeze-backbone"]).freeze_backbone
    lpft = main.resolve_config(["--backbone", LUNIT, "--frozen-epochs", "2"])
    assert not lpft.freeze_backbone and lpft.frozen_epochs == 2
    assert not main.resolve_config(["--backbone", CNN]).freeze_backbone


def test_an_unreachable_open_encoder_says_no_token_is_needed(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("not in the cache")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PipelineError, match="needs no token") as e:
        feature_backbone(ModelConfig(**model_settings(backbone=LUNIT, pretrained=True)))
    assert "accept the model's licence" not in str(e.value)
    assert "https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino" in str(e.value)
