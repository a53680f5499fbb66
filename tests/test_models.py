"""Models: outputs, masking, ablations, gradients, registry, config, compile, pretrained errors, CAM taps, profile."""
import json
from dataclasses import asdict, replace

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn as nn

from backbones import REFERENCE_MODEL, build_model, list_models, model_config
from backbones.baseline_resnet50 import ResNet50Transfer
from config import Config
from stages.report.efficiency import count_params, profile_model
from utils.helpers import PipelineError
from tests.conftest import model_settings

MAGS = ("40X", "100X", "200X", "400X")
KEYS = {"binary_logits", "subtype_logits", "embedding", "mag_weights", "hma_weights", "spatial_maps"}
TINY = model_settings(num_subtypes=5)
TINY_RESNET = model_settings(backbone="test_resnet", num_subtypes=5)
VARIANTS = {
    "mmnet": ("mmnet", {}),
    "mmnet_separate": ("mmnet", dict(shared_backbone=False)),
    "mmnet_no_spatial": ("mmnet", dict(use_spatial=False)),
    "mmnet_no_channel": ("mmnet", dict(use_channel=False)),
    "mmnet_no_hma": ("mmnet", dict(use_hma=False)),
    "mmnet_no_cmf": ("mmnet", dict(use_cmf=False)),
    "mmnet_only_200X": ("mmnet", dict(magnifications=("200X",))),
    "mmnet_40X_400X": ("mmnet", dict(magnifications=("400X", "40X"))),
    "mmnet_fields_100X": ("mmnet", dict(magnifications=("100X",) * 4)),
    "simple_concat": ("simple_concat", {}),
    "single_100X": ("single_mag", dict(magnifications=("100X",))),
    "single_any": ("single_mag", dict(magnifications=("any",))),
    "linear_probe": ("linear_probe", {}),
}
MASK = torch.tensor([[True, True, False, True], [False, True, True, True], [True, True, True, True]])


def build(name, **kw):
    torch.manual_seed(0)
    kind, extra = VARIANTS[name]
    return build_model(kind, **dict(TINY, **extra, **kw))


def batch(size=32, n=3, seed=0, slots=len(MAGS), width=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, slots, 3, size, width or size, generator=g)


def check_outputs(out, n, num_subtypes=5, slots=len(MAGS)):
    assert set(out) == KEYS
    assert out["binary_logits"].shape == (n,)
    assert out["subtype_logits"].shape == (n, num_subtypes)
    assert out["embedding"].ndim == 2 and out["embedding"].shape[0] == n
    assert out["mag_weights"].shape == (n, slots)
    for value in out.values():
        assert value is None or torch.isfinite(value).all()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_outputs_and_weights(name):
    model = build(name).eval()
    slots = len(model.magnifications)
    mask = MASK[:, :slots]
    with torch.no_grad():
        out = model(batch(slots=slots, width=48), mask)
    check_outputs(out, 3, slots=slots)
    used = torch.zeros(slots, dtype=torch.bool)
    used[model.used_mags] = True
    present = mask & used
    rows = present.any(1)
    w = out["mag_weights"]
    assert torch.allclose(w.sum(1), rows.float(), atol=1e-5) or name.startswith("single")
    assert (w[~present] == 0).all() or name.startswith("single")
    if out["hma_weights"] is not None:
        assert torch.allclose(out["hma_weights"].sum(1), rows.float(), atol=1e-5)
        assert (out["hma_weights"][~present] == 0).all()
    if out["spatial_maps"] is not None:
        assert out["spatial_maps"].shape[:2] == (3, slots)
        assert (out["spatial_maps"][~present] == 0).all()
        assert (out["spatial_maps"][present] > 0).all()


def test_single_mag_has_one_slot():
    model = build("single_100X").eval()
    out = model(batch(slots=1))
    assert model.used_mags == [0] and model.mag == "100X"
    assert out["mag_weights"].tolist() == [[1.0]] * 3
    with pytest.raises(PipelineError, match="one slot"):
        build_model("single_mag", **TINY)


def test_four_fields_of_one_magnification_fuse_four_distinct_inputs():
    model = build("mmnet_fields_100X").eval()
    assert model.used_mags == [0, 1, 2, 3] and len(model.branches) == 4
    x = batch()
    y = x.clone()
    y[:, 2] = torch.randn_like(y[:, 2])
    with torch.no_grad():
        assert not torch.allclose(model(x)["binary_logits"], model(y)["binary_logits"])


def test_hma_follows_magnification_order():
    model = build_model("mmnet", **dict(TINY, magnifications=("400X", "40X", "200X", "100X")))
    assert model.used_mags == [1, 3, 2, 0]


@pytest.mark.parametrize("name", ["mmnet", "mmnet_separate", "mmnet_no_cmf", "mmnet_40X_400X", "simple_concat",
                                  "linear_probe"])
@pytest.mark.parametrize("train", [False, True])
def test_masked_magnification_has_no_influence(name, train):
    model = build(name).train(train)
    slots = len(model.magnifications)
    mask = MASK[:, :slots]
    x = batch(slots=slots)
    y = x.clone()
    y[~mask] = torch.randn_like(y[~mask]) * 5
    torch.manual_seed(1)
    a = model(x, mask)
    torch.manual_seed(1)
    b = model(y, mask)
    for key in KEYS:
        if a[key] is not None:
            assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_all_masked_is_finite():
    model = build("mmnet").eval()
    out = model(batch(), torch.zeros(3, len(MAGS), dtype=torch.bool))
    for value in out.values():
        assert value is None or torch.isfinite(value).all()


@pytest.mark.parametrize("name", ["mmnet", "mmnet_separate", "simple_concat"])
def test_magnification_absent_from_whole_batch(name):
    model = build(name).train()
    mask = MASK.clone()
    mask[:, 1] = False
    out = model(batch(), mask)
    check_outputs(out, 3)
    assert (out["mag_weights"][:, 1] == 0).all()


@pytest.mark.parametrize("flag,attr", [
    ("use_spatial", "spatial"), ("use_channel", "channel"), ("use_hma", "hma"), ("use_cmf", "cmf"),
])
def test_ablation_removes_module(flag, attr):
    full = build("mmnet")
    ablated = build_model("mmnet", **dict(TINY, **{flag: False}))
    owner_full = full.branches[0] if attr in ("spatial", "channel") else full
    owner_ablated = ablated.branches[0] if attr in ("spatial", "channel") else ablated
    assert isinstance(getattr(owner_full, attr), nn.Module)
    assert getattr(owner_ablated, attr) is None
    assert count_params(ablated) < count_params(full)


def test_subset_of_magnifications_is_smaller():
    full = build("mmnet")
    single = build("mmnet_only_200X")
    assert single.used_mags == [0] and len(single.branches) == 1
    assert single.hma is None and single.cmf is None
    assert count_params(single) < count_params(full)
    with pytest.raises(PipelineError):
        build_model("mmnet", **dict(TINY, magnifications=()))


def test_separate_backbones_have_more_params():
    shared, separate = build("mmnet"), build("mmnet_separate")
    assert len(shared.backbones) == 1 and len(separate.backbones) == len(MAGS)
    assert count_params(separate) > count_params(shared)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_trainable_parameter_gets_a_gradient(name):
    model = build(name).train()
    out = model(batch(), None)
    loss = out["binary_logits"].sum() + out["subtype_logits"].logsumexp(1).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing


def test_param_groups_split_backbone_and_head():
    model = build("mmnet")
    backbone, head = model.param_groups()
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in head)
    assert {id(p) for p in model.subtype_head.parameters()} <= {id(p) for p in head}


@pytest.mark.parametrize("name", ["mmnet", "simple_concat", "single_100X"])
def test_eval_is_deterministic(name):
    model = build(name).eval()
    x = batch()
    a, b = model(x, MASK), model(x, MASK)
    assert torch.equal(a["binary_logits"], b["binary_logits"])
    assert torch.equal(a["subtype_logits"], b["subtype_logits"])


def test_subtype_head_reads_embedding():
    model = build("mmnet").eval()
    out = model(batch(), MASK)
    assert torch.allclose(model.subtype_head(out["embedding"]), out["subtype_logits"], atol=1e-6)


def test_registry_builds_every_name():
    assert set(list_models()) == {"mmnet", "simple_concat", "single_mag", "resnet50_transfer", "linear_probe"}
    for name in list_models():
        model = registry_model(name).eval()
        slots = len(model.magnifications)
        check_outputs(model(batch(64 if name == "resnet50_transfer" else 32, n=2, slots=slots)), 2, slots=slots)


def registry_model(name):
    torch.manual_seed(0)
    one = dict(magnifications=("40X",)) if name in ("single_mag", "resnet50_transfer") else {}
    return build_model(name, **dict(TINY_RESNET if name == "resnet50_transfer" else TINY, **one))


def test_registry_names_and_reference():
    assert REFERENCE_MODEL in list_models()
    assert all(registry_model(name).name == name for name in list_models())


@pytest.mark.parametrize("name", ["mmnet", "resnet50_transfer"])
def test_config_round_trips_through_checkpoint_kwargs(name):
    model = registry_model(name)
    kwargs = json.loads(json.dumps(asdict(model.cfg)))
    rebuilt = build_model(name, **kwargs)
    assert rebuilt.cfg == model.cfg
    rebuilt.load_state_dict(model.state_dict())
    from_cfg = build_model(name, model.cfg, num_subtypes=7)
    assert from_cfg.cfg.num_subtypes == 7 and from_cfg.cfg.backbone == model.cfg.backbone


def test_model_settings_come_from_the_config_and_unknown_or_missing_ones_are_named():
    cfg = Config()
    mmnet = model_config(cfg, "mmnet", 8)
    assert (mmnet.backbone, mmnet.feature_stage, mmnet.drop_rate, mmnet.embed_dim) == (cfg.backbone, cfg.feature_stage,
                                                                                       cfg.drop_rate, 256)
    resnet = model_config(replace(cfg, pretrained_path="w.pth", feature_stage=(2,)), "resnet50_transfer", 8,
                          backbone=cfg.resnet_backbone)
    assert (resnet.backbone, resnet.embed_dim, resnet.pretrained_path, resnet.feature_stage) == ("resnet50", 512, "",
                                                                                                 (-1,))
    with pytest.raises(PipelineError, match="use_hma"):
        build_model("mmnet", use_hmaa=False, **TINY)
    with pytest.raises(PipelineError, match="backbone"):
        build_model("mmnet", num_subtypes=3)


@pytest.mark.parametrize("name", ["mmnet", "simple_concat", "single_mag", "resnet50_transfer"])
def test_fullgraph_compile_forward_and_backward(name):
    model = registry_model(name).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    slots = len(model.magnifications)
    x, mask = batch(64, slots=slots), MASK[:, :slots]
    with torch.no_grad():
        want, got = model(x, mask), compiled(x, mask)
    for key in KEYS:
        assert (want[key] is None) == (got[key] is None)
        assert want[key] is None or torch.allclose(want[key], got[key], atol=1e-5), key
    model.train()
    out = compiled(x, mask)
    (out["binary_logits"].sum() + out["subtype_logits"].logsumexp(1).sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    torch._dynamo.reset()


def test_unknown_model_lists_valid_names():
    with pytest.raises(PipelineError, match="simple_concat"):
        build_model("mmnett", **TINY)
    with pytest.raises(PipelineError, match="timm backbone"):
        build_model("mmnet", **dict(TINY, backbone="no_such_net"))
    with pytest.raises(PipelineError, match="ResNet backbone"):
        build_model("resnet50_transfer", **dict(TINY, magnifications=("40X",)))


def test_resnet50_transfer_freezing_pattern():
    model = ResNet50Transfer(model_config(replace(Config(), pretrained=False), "resnet50_transfer", 5, backbone="resnet50",
                                          magnifications=("40X",)))
    net = model.backbone
    assert not any(p.requires_grad for p in net.conv1.parameters())
    assert not any(p.requires_grad for p in net.layer1[0].conv1.parameters())
    assert not any(p.requires_grad for p in net.layer2[-1].conv2.parameters())
    assert not any(p.requires_grad for p in net.layer3[0].conv1.parameters())
    assert all(p.requires_grad for p in net.layer3[-1].parameters())
    assert all(p.requires_grad for p in net.layer4.parameters())
    assert all(p.requires_grad for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert model.neck[1].in_features == 2048 and model.neck[1].out_features == 512
    assert 0 < count_params(model, trainable=True) < count_params(model)
    backbone, head = model.param_groups()
    assert all(p.requires_grad for p in backbone + head)


def test_resnet50_transfer_reads_one_slot():
    model = build_model("resnet50_transfer", **dict(TINY_RESNET, magnifications=("200X",))).eval()
    x = batch(64, n=2, slots=1, width=96)
    assert model.reads(model.cfg) == ("200X",)
    assert model(x)["binary_logits"].shape == (2,) and model(x)["mag_weights"].eq(1).all()


def test_offline_pretrained_is_a_pipeline_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError) as err:
        build_model("mmnet", **model_settings(backbone="test_efficientnet", pretrained=True))
    message = str(err.value)
    assert "test_efficientnet" in message and "--no-pretrained" in message and "--pretrained-path" in message


def test_pretrained_path_loads_local_weights(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("test_efficientnet")
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model("mmnet", **model_settings(pretrained_path=str(path), num_subtypes=5, pretrained=True))
    assert torch.equal(model.backbones[0].conv_stem.weight, source.conv_stem.weight)
    with pytest.raises(PipelineError, match="does not exist"):
        build_model("mmnet", **model_settings(pretrained_path=str(tmp_path / "nope.pth"), pretrained=True))
    with pytest.raises(PipelineError, match="not a weights file"):
        build_model("single_mag", **model_settings(backbone="test_resnet", pretrained_path=str(path), pretrained=True,
                                                   magnifications=("40X",)))


@pytest.mark.parametrize("name", ["mmnet", "mmnet_separate", "mmnet_40X_400X", "simple_concat", "single_100X"])
def test_cam_layers_see_feature_maps(name):
    model = build(name).eval()
    shapes, grads = [], []
    layer = model.cam_layers()[0]
    layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    layer.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    out = model(batch(64), MASK)
    out["binary_logits"].sum().backward()
    m = len(model.used_mags)
    channels = model.num_features
    assert shapes == [(3 * m, channels, 2, 2)]
    assert grads and grads[0].shape == (3 * m, channels, 2, 2)


def test_resnet_cam_layer():
    model = registry_model("resnet50_transfer").eval()
    shapes = []
    model.cam_layers()[0].register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model(batch(64, n=2, slots=1))
    assert shapes == [(2, model.num_features, 2, 2)]


def test_profile_model_counts_and_leaves_model_clean():
    model = build("mmnet")
    before = set(dict(model.named_buffers()))
    stats = profile_model(model, len(MAGS), 32, "cpu", threads=1, repeats=2, warmup=1)
    assert set(dict(model.named_buffers())) == before
    assert stats["params"] == count_params(model)
    assert stats["macs"] > 0 and stats["flops"] == 2 * stats["macs"]
    assert stats["ms_median"] > 0 and stats["threads"] == 1
    single = profile_model(build("single_100X"), 1, 32, "cpu", threads=1, repeats=2, warmup=1)
    wide = profile_model(model, len(MAGS), (32, 48), "cpu", threads=1, repeats=1, warmup=0)
    assert wide["macs"] > stats["macs"]
    assert single["macs"] < stats["macs"]
