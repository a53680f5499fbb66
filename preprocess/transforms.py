"""Batch augmentation on the device with kornia: flips, 90-degree turns, small affine, colour and HED stain jitter."""
import kornia.augmentation as K
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

MEAN = tuple(IMAGENET_DEFAULT_MEAN)
STD = tuple(IMAGENET_DEFAULT_STD)

# skimage.color.rgb_from_hed (Ruifrok & Johnston): optical density of haematoxylin, eosin and DAB in R, G, B
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

GEOMETRY = torch.nn.Sequential(
    K.RandomHorizontalFlip(p=0.5),
    K.RandomRotation90(times=(0, 3), p=1.0),
    K.RandomAffine(degrees=10.0, translate=(0.025, 0.025), scale=(0.9, 1.1), padding_mode="reflection", p=0.5),
)
COLOUR = K.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, p=1.0)


def to_float(images, device):
    """uint8 (B, M, S, S, 3) -> float (B, M, 3, S, S) in [0, 1] on `device`."""
    x = images.to(device, non_blocking=True).permute(0, 1, 4, 2, 3)
    return x.float().div_(255)


def normalize(x, mean=MEAN, std=STD):
    mean = x.new_tensor(mean).view(1, 1, 3, 1, 1)
    std = x.new_tensor(std).view(1, 1, 3, 1, 1)
    return (x - mean) / std


def hed_jitter(x, scale=0.05, shift=0.05):
    """HED stain jitter (Tellez et al.): per-image gain and offset of each stain density, folded into one linear map."""
    n, hed_from_rgb, rgb_from_hed = x.shape[0], HED_FROM_RGB.to(x), RGB_FROM_HED.to(x)
    gain = torch.empty(n, 3, device=x.device, dtype=x.dtype).uniform_(1 - scale, 1 + scale)
    offset = torch.empty(n, 3, device=x.device, dtype=x.dtype).uniform_(-shift, shift)
    mix = hed_from_rgb @ torch.diag_embed(gain) @ rgb_from_hed
    od = -torch.log(x.clamp_min(1e-6)).flatten(2)
    od = torch.baddbmm((offset @ rgb_from_hed).unsqueeze(2), mix.transpose(1, 2), od)
    return torch.exp(-od).view_as(x).clamp_(0, 1)


def augment(x):
    """Independent random augmentation of every image in a (B, M, 3, S, S) batch in [0, 1]."""
    flat = x.reshape(-1, *x.shape[2:])
    flat = hed_jitter(COLOUR(GEOMETRY(flat)))
    return flat.reshape(x.shape)


def prepare(images, mask, device, train=False, mean=MEAN, std=STD):
    """Cached uint8 tuples -> float batch on the device normalised with the backbone's mean and std; absent
    magnifications are zero."""
    x = to_float(images, device)
    if train:
        x = augment(x)
    x = normalize(x, mean, std)
    mask = mask.to(device, non_blocking=True)
    return x * mask.view(*mask.shape, 1, 1, 1).to(x.dtype), mask


def tta_views(x):
    """Identity, horizontal flip, vertical flip and a 90-degree turn of a (B, M, 3, S, S) batch."""
    return [x, x.flip(-1), x.flip(-2), x.rot90(1, dims=(-2, -1))]
