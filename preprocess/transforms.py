"""Batch augmentation on the device with kornia: a random square crop of each whole field with mild zoom, flips from
the orientations evaluation also sees, colour and HED stain jitter. Evaluation reads whole fields at their own aspect."""
from functools import lru_cache

import kornia.augmentation as K
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

MEAN = tuple(IMAGENET_DEFAULT_MEAN)
STD = tuple(IMAGENET_DEFAULT_STD)

# skimage.color.rgb_from_hed (Ruifrok & Johnston): optical density of haematoxylin, eosin and DAB in R, G, B
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

ORIENTATIONS = 4  # identity, horizontal flip, vertical flip, both (a half turn): the turns that keep a field's shape
ZOOM = 1.2  # a training crop's side is S / z for z in [1, ZOOM], resized to S
HED_SIGMA = 0.2  # per-image stain density gain in [1 - s, 1 + s] and offset in [-s, s] (Tellez et al. 2019, HED-strong)
HUE = 0.1  # hue and saturation jitter (Tellez et al. 2019, HSV-light)
COLOUR = K.ColorJitter(brightness=0.1, contrast=0.1, saturation=HUE, hue=HUE, p=1.0)
FLIPS = torch.nn.Sequential(K.RandomHorizontalFlip(p=0.5), K.RandomVerticalFlip(p=0.5))


def orient(x, k):
    """The k-th of the ORIENTATIONS views of images (..., H, W): bit 0 flips the width, bit 1 the height."""
    if k & 1:
        x = x.flip(-1)
    return x.flip(-2) if k & 2 else x


def to_float(images, device):
    """uint8 (B, M, H, W, 3) -> float (B, M, 3, H, W) in [0, 1] on `device`."""
    x = images.to(device, non_blocking=True).permute(0, 1, 4, 2, 3)
    return x.float().div_(255)


def normalize(x, mean=MEAN, std=STD):
    mean = x.new_tensor(mean).view(1, 1, 3, 1, 1)
    std = x.new_tensor(std).view(1, 1, 3, 1, 1)
    return (x - mean) / std


def hed_map(x, gain, offset):
    """Images (N, 3, H, W) in [0, 1] with each stain density (haematoxylin, eosin, DAB) times `gain` plus `offset`,
    both (N, 3), folded into one linear map of the optical density."""
    hed_from_rgb, rgb_from_hed = HED_FROM_RGB.to(x), RGB_FROM_HED.to(x)
    mix = hed_from_rgb @ torch.diag_embed(gain) @ rgb_from_hed
    od = -torch.log(x.clamp_min(1e-6)).flatten(2)
    od = torch.baddbmm((offset @ rgb_from_hed).unsqueeze(2), mix.transpose(1, 2), od)
    return torch.exp(-od).view_as(x).clamp_(0, 1)


def hed_jitter(x, scale=HED_SIGMA, shift=HED_SIGMA):
    """HED stain jitter (Tellez et al.): a random gain and offset of each stain density per image."""
    n = x.shape[0]
    gain = torch.empty(n, 3, device=x.device, dtype=x.dtype).uniform_(1 - scale, 1 + scale)
    offset = torch.empty(n, 3, device=x.device, dtype=x.dtype).uniform_(-shift, shift)
    return hed_map(x, gain, offset)


@lru_cache(maxsize=16)
def cropper(height, width, size):
    """Random square crops of side size / z (z uniform-area in [1, ZOOM]) anywhere in a height x width field, resized
    to size x size."""
    area = height * width
    return K.RandomResizedCrop((size, size), scale=((size / ZOOM) ** 2 / area, size ** 2 / area), ratio=(1.0, 1.0))


def augment(x, size):
    """Independent random crop, flips and colour of every image in a (B, M, 3, H, W) batch in [0, 1] ->
    (B, M, 3, size, size)."""
    flat = x.reshape(-1, *x.shape[2:])
    flat = cropper(x.shape[-2], x.shape[-1], size)(flat)
    flat = hed_jitter(COLOUR(FLIPS(flat)))
    return flat.reshape(*x.shape[:3], size, size)


def prepare(images, mask, device, train=False, size=None, mean=MEAN, std=STD):
    """Cached uint8 fields -> float batch on the device normalised with the backbone's mean and std: augmented square
    crops of side `size` when training, whole fields otherwise; absent images are zero."""
    x = to_float(images, device)
    if train:
        x = augment(x, size or min(x.shape[-2:]))
    x = normalize(x, mean, std)
    mask = mask.to(device, non_blocking=True)
    return x * mask.view(*mask.shape, 1, 1, 1).to(x.dtype), mask


def tta_views(x):
    """The ORIENTATIONS views of a (B, M, 3, H, W) batch: identity, flips and the half turn."""
    return [orient(x, k) for k in range(ORIENTATIONS)]
