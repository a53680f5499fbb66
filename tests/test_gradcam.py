"""Grad-CAM on the four-input models: map size and range, absent/unused magnifications, released hooks."""
import pytest
import torch
import torch.nn.functional as F

from backbones import build_model
from backbones.our.gradcam import attention_maps, gradcam
from tests.conftest import model_settings

MAGS = ("40X", "100X", "200X", "400X")
SIZE = 48  # test_efficientnet has stride 32: 48 px gives 2x2 feature maps, 32 px a single cell



def tiny(name, **flags):
    torch.manual_seed(0)
    return build_model(name, **model_settings(**dict(dict(magnifications=MAGS, num_subtypes=3, drop_rate=0.0), **flags)))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def signal_batch(n, generator):
    """Noise tuples; malignant ones carry a bright patch in the top-left corner of every image."""
    y = torch.arange(n) % 2
    x = torch.randn(n, len(MAGS), 3, SIZE, SIZE, generator=generator) * 0.5
    x[y == 1, :, :, 2:20, 2:20] += 2.0
    return x, y


@pytest.mark.parametrize("name,flags", [
    ("mmnet", {}), ("mmnet", {"shared_backbone": False}), ("simple_concat", {}), ("single_mag", {"magnifications": ("200X",)}),
])
def test_maps_have_input_size_range_and_hooks_are_released(name, flags):
    model = tiny(name, **flags).train()
    x = torch.randn(3, len(MAGS), 3, SIZE, 72)  # a whole field, wider than high
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    maps = gradcam(model, x, mask)
    assert maps.shape == (3, len(MAGS), SIZE, 72)
    assert maps.min() >= 0 and maps.max() <= 1
    assert maps[1, 1].abs().sum() == 0 and maps[2, 3].abs().sum() == 0
    unused = [j for j in range(len(MAGS)) if j not in model.used_mags]
    assert all(maps[:, j].abs().sum() == 0 for j in unused)
    assert hook_count(model) == 0
    assert model.training


def test_hooks_are_released_when_the_forward_fails():
    model = tiny("mmnet")
    with pytest.raises(Exception):
        gradcam(model, torch.randn(2, len(MAGS), 5, SIZE, SIZE))
    assert hook_count(model) == 0


def test_briefly_trained_mmnet_gives_non_constant_maps():
    model = tiny("mmnet")
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    model.train()
    for _ in range(5):
        x, y = signal_batch(8, generator)
        loss = F.binary_cross_entropy_with_logits(model(x)["binary_logits"], y.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, _ = signal_batch(4, generator)
    maps = gradcam(model, x)
    spread = maps.flatten(2).std(-1)
    assert (spread > 0.05).float().mean() > 0.5
    subtype = gradcam(model, x, target="subtype", class_idx=1)
    assert subtype.shape == maps.shape and subtype.flatten(2).std(-1).max() > 0
    assert hook_count(model) == 0


def test_attention_maps_follow_the_model():
    x = torch.randn(2, len(MAGS), 3, SIZE, SIZE)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    maps, out = attention_maps(tiny("mmnet"), x, mask)
    assert maps.shape == (2, len(MAGS), SIZE, SIZE)
    assert maps[1, 0].abs().sum() == 0
    assert torch.allclose(out["mag_weights"].sum(1), torch.ones(2), atol=1e-5)
    assert attention_maps(tiny("simple_concat"), x, mask)[0] is None
    assert attention_maps(tiny("mmnet", use_spatial=False), x, mask)[0] is None
