"""Batch augmentation: kornia geometry and colour, HED stain jitter."""
import torch

from preprocess.transforms import augment, hed_jitter

HAEMATOXYLIN = torch.tensor([0.65, 0.70, 0.29])


def test_augment_is_random_per_image_and_magnification_and_stays_in_range():
    torch.manual_seed(0)
    image = torch.rand(3, 24, 24)
    x = image.expand(3, 4, 3, 24, 24).clone()
    x[0, 0] = 0
    x[0, 1] = 1
    out = augment(x, 24)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    flat = out[1:].reshape(8, -1)
    assert (torch.cdist(flat, flat) + torch.eye(8)).min() > 1e-3


def test_augment_is_reproducible_under_a_seed():
    x = torch.rand(2, 4, 3, 16, 16)
    torch.manual_seed(5)
    first = augment(x, 16)
    torch.manual_seed(5)
    assert torch.equal(first, augment(x, 16))


def test_hed_jitter_without_gain_or_offset_is_identity():
    x = torch.rand(4, 3, 8, 8) * 0.98 + 0.01
    assert torch.allclose(hed_jitter(x, scale=0, shift=0), x, atol=1e-5)


def test_hed_jitter_rescales_a_pure_haematoxylin_pixel_along_its_own_colour():
    torch.manual_seed(0)
    density = torch.tensor([0.2, 0.5, 1.0, 1.5]).view(4, 1, 1, 1)
    x = torch.exp(-density * HAEMATOXYLIN.view(1, 3, 1, 1)).expand(4, 3, 5, 5)
    out = hed_jitter(x, scale=0.2, shift=0)
    od = -torch.log(out[:, :, 0, 0])
    gain = od / (density.view(4, 1) * HAEMATOXYLIN)
    assert torch.allclose(gain, gain[:, :1].expand_as(gain), atol=1e-4)
    assert ((gain - 1).abs() <= 0.2 + 1e-4).all() and (gain - 1).abs().max() > 1e-3
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))
