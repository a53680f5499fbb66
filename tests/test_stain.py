import cv2
import numpy as np

from preprocess.cache import macenko
from tests.conftest import SAMPLES


def optical_density(rgb):
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / 240)


def stain_colour(rgb, mask):
    """Direction of the mean optical density over the tissue pixels: the stain hue, free of its strength."""
    mean = optical_density(rgb)[mask].mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_macenko_brings_the_stain_colour_of_real_samples_together():
    raw, norm = [], []
    for path in sorted(SAMPLES.glob("*.png")):
        rgb = cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), (96, 96), interpolation=cv2.INTER_AREA)
        mask = np.all(optical_density(rgb) > 0.15, axis=1)
        if mask.mean() < 0.1:
            continue
        raw.append(stain_colour(rgb, mask))
        norm.append(stain_colour(macenko(rgb)[0], mask))
    assert len(raw) >= 4
    assert np.std(norm, axis=0).sum() < np.std(raw, axis=0).sum()
