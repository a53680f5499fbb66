"""A synthetic BreakHis: the real folder layout and file names, H&E-like tissue drawn with numpy/opencv.

Generative model. Each patient has a latent malignancy strength (zero when benign) and a focus: the magnifications
where the tumour shows (low: 40X and 100X, high: 200X and 400X, or all four). An image's expression is its patient's
strength at that magnification, jittered per image; it sets the share of the field that tumour nests (dense, large,
pleomorphic nuclei) take over from benign tissue (glands lined by small round nuclei in pink stroma). Within a
patient, some malignant fields look benign (expression 0) and some benign fields look malignant (label-noise-like).
Class-unrelated nuisance per patient: stain colours and strengths, brightness, tissue density (fat spaces, stromal
cells). The difficulty (easy / default / hard) scales the strengths, the focus, the within-patient noise and the
nuisance. Magnification sets the scale (40X: many small structures, 400X: a few large nuclei). The plan (one row
per file with its latent values) is separate from the drawing, so a preset can be checked without writing images.
"""
import argparse
import multiprocessing
import os
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from config import MAGNIFICATIONS
from preprocess.analyze import MARKER, SUBTYPES, stem_of
from utils.helpers import PipelineError

FULL_COUNTS = {
    "A": (114, 113, 111, 106), "F": (253, 260, 264, 237), "PT": (109, 121, 108, 115), "TA": (149, 150, 140, 130),
    "DC": (864, 903, 896, 788), "LC": (156, 170, 163, 137), "MC": (205, 222, 196, 169), "PC": (145, 142, 135, 138),
}
PRESETS = {
    "tiny": dict(slides=dict(A=2, F=2, PT=2, TA=2, DC=3, LC=2, MC=2, PC=1), per_mag=3, size=(96, 64),
                 missing=True, extras=False, difficulty="easy"),
    "demo": dict(slides=dict(A=3, F=4, PT=2, TA=3, DC=6, LC=3, MC=3, PC=2), per_mag=6, size=(175, 115),
                 missing=True, extras=False, difficulty="default"),
    "full": dict(slides=dict(A=4, F=10, PT=3, TA=7, DC=38, LC=5, MC=9, PC=6), counts=FULL_COUNTS, size=(700, 460),
                 missing=False, extras=True, difficulty="default"),
}
ZOOM = {"40X": 1.0, "100X": 2.5, "200X": 5.0, "400X": 10.0}
H_VEC = np.array([0.65, 0.70, 0.29])
E_VEC = np.array([0.07, 0.99, 0.11])
RENDER_WIDTH = (256, 384)
DIFFICULTY = {  # malignant strength range, share of patients with the cue at low / at high magnification only,
    # share of fields showing it at the other magnifications, benign-looking fields in malignant patients, malignant-looking fields
    # in benign patients, nuisance scale
    "easy": dict(strength=(0.8, 1.0), focus=(0.0, 0.0), off=1.0, blank=0.0, flip=0.0, nuisance=0.3),
    "default": dict(strength=(0.3, 1.0), focus=(0.4, 0.4), off=0.0, blank=0.2, flip=0.05, nuisance=1.0),
    "hard": dict(strength=(0.15, 0.8), focus=(0.5, 0.5), off=0.0, blank=0.3, flip=0.1, nuisance=1.5),
}
FOCUS = {"low": ("40X", "100X"), "high": ("200X", "400X"), "all": MAGNIFICATIONS, "none": ()}


def preset_settings(preset, **overrides):
    """The preset's settings with overrides applied."""
    if preset not in PRESETS:
        raise PipelineError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = dict(counts=None, per_mag=0)
    settings.update(PRESETS[preset])
    settings.update(overrides)
    if settings["difficulty"] not in DIFFICULTY:
        raise PipelineError(f"unknown synthetic difficulty {settings['difficulty']!r}; "
                            f"choose one of {', '.join(DIFFICULTY)}")
    return settings


def slide_ids(slides, extras, rng):
    """Slide ids per subtype code, with letter-suffixed slides sharing a stem and stems shared by two subtypes."""
    total = sum(slides.values())
    stems = iter(f"14-{s}" for s in rng.choice(np.arange(1000, 30000), size=total, replace=False))
    ids = {code: [next(stems) for _ in range(n)] for code, n in slides.items()}
    a, f, pt, ta = (ids.get(c, []) for c in ("A", "F", "PT", "TA"))
    if len(a) >= 2:
        a[0], a[1] = a[0] + "AB", a[0] + "CD"
    if ids.get("DC") and ids.get("LC"):
        ids["LC"][0] = ids["DC"][0]
    if not extras:
        return ids
    a[2] = stem_of(a[0]) + "G"
    a[3], f[0] = a[3] + "AB", a[3] + "CDEF"
    f[1], f[2], f[3] = f[1] + "AB", f[1] + "CD", f[1] + "EF"
    pt[0] = f[1]
    ta[1] = ta[0] + "CD"
    return ids


def split_count(total, n, rng):
    """Split total into n positive parts of uneven size (largest remainder)."""
    weights = rng.uniform(0.6, 1.4, n)
    raw = total * weights / weights.sum()
    parts = np.floor(raw).astype(int)
    parts[np.argsort(raw - parts)[::-1][: total - parts.sum()]] += 1
    return parts


def image_counts(settings, ids, rng):
    """{(code, slide_id): [n per magnification]}."""
    counts = {}
    for code, slides in ids.items():
        if settings["counts"]:
            per_mag = [split_count(t, len(slides), rng) for t in settings["counts"][code]]
            counts.update({(code, s): [int(p[i]) for p in per_mag] for i, s in enumerate(slides)})
            continue
        counts.update({(code, s): [settings["per_mag"]] * len(MAGNIFICATIONS) for s in slides})
    if settings["missing"] and ids.get("MC"):
        counts[("MC", ids["MC"][-1])][-1] = 0
    return counts


def latent(seed, key, salt):
    """Random generator for one patient or one file, independent of the rest of the plan."""
    return np.random.default_rng([seed, zlib.crc32(key.encode()), salt])


def stratified(n, k, rng):
    """n x k uniforms; each column puts one value in each of n equal strata, in random order."""
    return (rng.random((n, k)).argsort(axis=0) + rng.random((n, k))) / n


def patient_traits(malignant, seed, level):
    """Latent values per patient, stratified within each class so that every tree realises the intended shares."""
    d = DIFFICULTY[level]
    (lo, hi), (p_low, p_high), nu = d["strength"], d["focus"], d["nuisance"]
    rng = np.random.default_rng([seed, 1])
    parts = []
    for cls, ids in malignant.groupby(malignant):
        u = stratified(len(ids), 6, rng)
        focus = np.where(u[:, 1] < p_low, "low", np.where(u[:, 1] < p_low + p_high, "high", "all"))
        parts.append(pd.DataFrame(dict(
            strength=cls * (lo + (hi - lo) * u[:, 0]), focus=focus if cls else "none",
            host=np.array(list(GLANDS))[(u[:, 2] * len(GLANDS)).astype(int)], density=1 - 0.5 * nu * u[:, 3],
            hematoxylin=1.6 + 0.3 * nu * (2 * u[:, 4] - 1), eosin=0.9 + 0.2 * nu * (2 * u[:, 5] - 1)), index=ids.index))
    return pd.concat(parts)


def image_traits(files, seed, level):
    """Expression, tissue density and brightness of every image: its patient's latents with per-image variation,
    and a brightness per patient and magnification (the illumination of each objective and session)."""
    d = DIFFICULTY[level]
    sessions = files["patient_id"] + files["magnification"]
    light = {key: latent(seed, key, 3).uniform(-1, 1) for key in sessions.unique()}
    brightness = 1 + 0.1 * d["nuisance"] * sessions.map(light).to_numpy()
    u = np.array([latent(seed, f, 2).random(3) for f in files["file"]]).reshape(-1, 3)
    on = np.array([m in FOCUS[f] for m, f in zip(files["magnification"], files["focus"])])
    shows = np.where(on, u[:, 0] >= d["blank"], u[:, 0] < d["off"])
    strength = np.minimum(1.0, files["strength"] * (0.7 + 0.6 * u[:, 1]))
    malignant = files["class_name"].eq("malignant")
    expression = np.where(malignant, strength * shows, (u[:, 0] < d["flip"]) * (0.4 + 0.5 * u[:, 1]))
    density = np.clip(files["density"] + 0.1 * d["nuisance"] * (2 * u[:, 2] - 1), 0, 1)
    return expression, density, brightness


def plan(preset="demo", seed=0, **overrides):
    """One row per file of the synthetic tree: labels, relative path in the tarball layout, image size, latents."""
    settings = preset_settings(preset, **overrides)
    level = settings["difficulty"]
    rng = np.random.default_rng(seed)
    ids = slide_ids(settings["slides"], settings["extras"], rng)
    width, height = settings["size"]
    rows = []
    for (code, slide), per_mag in image_counts(settings, ids, rng).items():
        class_name, subtype = SUBTYPES[code]
        letter = class_name[0].upper()
        folder = f"histology_slides/breast/{class_name}/SOB/{subtype}/SOB_{letter}_{code}_{slide}"
        for mag, n in zip(MAGNIFICATIONS, per_mag):
            for seq in range(1, n + 1):
                file = f"SOB_{letter}_{code}-{slide}-{mag[:-1]}-{seq:03d}.png"
                rows.append(dict(class_name=class_name, subtype_code=code, subtype=subtype, slide_id=slide,
                                 patient_id=stem_of(slide), magnification=mag, seq=seq, file=file,
                                 relpath=f"{folder}/{mag}/{file}", width=width, height=height))
    files = pd.DataFrame(rows)
    malignant = files.groupby("patient_id")["class_name"].first().eq("malignant")
    files = files.join(patient_traits(malignant, seed, level), on="patient_id")
    files["host"] = files["host"].where(files["class_name"].eq("malignant"), files["subtype_code"])
    files["expression"], files["density"], files["brightness"] = image_traits(files, seed, level)
    files["difficulty"] = level
    return files


def smooth_noise(h, w, cell, rng):
    """Smooth random field in [0, 1] with features about `cell` pixels wide."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    field = cv2.resize(rng.random((gh, gw), dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0, 1)


def stroma(h, w, px, rng):
    """Eosin density of wavy collagen fibres."""
    fibres = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), sigmaX=4 * px + 1, sigmaY=0.4 * px + 0.5)
    fibres = (fibres - fibres.mean()) / (fibres.std() + 1e-6)
    shift = (smooth_noise(h, w, 40 * px + 8, rng) - 0.5) * 30 * px
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    fibres = cv2.remap(fibres, grid_x, grid_y + shift, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return np.clip(0.45 + 0.12 * fibres + 0.2 * (smooth_noise(h, w, 60 * px + 8, rng) - 0.5), 0.1, 0.9)


def draw_nuclei(hmap, xs, ys, ra, rb, angles, values):
    """Filled ellipses into the hematoxylin map; tiny ones are splatted and blurred instead."""
    if len(xs) == 0:
        return
    if np.median(ra) >= 2.5:
        for x, y, a, b, t, v in zip(xs, ys, ra, rb, angles, values):
            cv2.ellipse(hmap, (int(x), int(y)), (max(1, int(a)), max(1, int(b))), float(t), 0, 360, float(v), -1)
        return
    h, w = hmap.shape
    keep = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    flat = ys[keep].astype(int) * w + xs[keep].astype(int)
    spots = np.bincount(flat, weights=values[keep] * (ra[keep] * rb[keep] * np.pi), minlength=h * w)
    sigma = max(0.5, 0.75 * float(np.median(ra)))
    spots = cv2.GaussianBlur(spots.reshape(h, w).astype(np.float32), (0, 0), sigma)
    np.maximum(hmap, np.minimum(spots, 1.6), out=hmap)


def ring_nuclei(cx, cy, a, b, angle, r, rng):
    """Evenly spaced nuclei along an ellipse (the epithelial lining of a gland)."""
    n = max(6, int(2 * np.pi * np.sqrt((a * a + b * b) / 2) / (2.6 * r)))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    x, y = a * np.cos(t), b * np.sin(t)
    xs = cx + x * c - y * s + rng.normal(0, 0.15 * r, n)
    ys = cy + x * s + y * c + rng.normal(0, 0.15 * r, n)
    return xs, ys, np.degrees(t) + angle


GLANDS = {  # gland radius, spacing, elongation, stromal cell density
    "A": (0.8, 2.3, 1.2, 1.0), "F": (1.0, 3.4, 2.6, 1.0), "PT": (1.1, 4.0, 3.5, 3.0), "TA": (0.9, 2.2, 1.0, 1.0),
}


def glands(h, w, big_r, spacing, elong, lobule, rng):
    """Epithelium and lumen masks of glands on a jittered grid inside the lobules, plus their lining nuclei."""
    step = max(4.0, spacing * big_r)
    epi, lumen = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    nuclei = []
    for cy in np.arange(-rng.uniform(0, step), h + big_r, step):
        for cx in np.arange(-rng.uniform(0, step), w + big_r, step):
            x, y = cx + rng.normal(0, 0.12 * step), cy + rng.normal(0, 0.12 * step)
            if not lobule[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)]:
                continue
            a = big_r * rng.uniform(0.85, 1.15) * np.sqrt(elong)
            b = big_r * rng.uniform(0.85, 1.15) / np.sqrt(elong)
            angle = rng.uniform(0, 180)
            cv2.ellipse(epi, (int(x), int(y)), (int(a), int(b)), angle, 0, 360, 1.0, -1)
            cv2.ellipse(lumen, (int(x), int(y)), (int(0.55 * a), int(0.55 * b)), angle, 0, 360, 1.0, -1)
            nuclei.append(ring_nuclei(x, y, 0.78 * a, 0.78 * b, angle, 1.3 * big_r / 20, rng))
    return epi, lumen, nuclei


def fat(h, w, px, share, outside, rng):
    """Mask of empty adipocytes over about `share` of the field, outside the lobules."""
    field = smooth_noise(h, w, 50 * px + 8, rng)
    region = outside & (field > np.quantile(field, 1 - share))
    radius = 12 * px + 2
    step = 2 * radius
    ys, xs = np.mgrid[-rng.uniform(0, step):h + radius:step, -rng.uniform(0, step):w + radius:step]
    ys, xs = ys.ravel() + rng.normal(0, 0.15 * step, ys.size), xs.ravel() + rng.normal(0, 0.15 * step, xs.size)
    cells = np.zeros((h, w), np.uint8)
    for x, y, r in zip(xs, ys, radius * rng.uniform(0.75, 1.0, xs.size)):
        cv2.circle(cells, (int(x), int(y)), int(r), 1, -1)
    return region & cells.astype(bool)


def benign_field(h, w, px, code, density, rng):
    """Regular glands lined by small round nuclei in pink stroma; density sets stromal cells and fat spaces."""
    emap, hmap = stroma(h, w, px, rng), np.zeros((h, w), np.float32)
    radius, spacing, elong, cells = GLANDS[code]
    big_r, r = 20 * px * radius, 1.3 * px * radius
    lobule = smooth_noise(h, w, min(90 * px, 0.5 * w), rng) > rng.uniform(0.3, 0.5)
    epi, lumen, nuclei = glands(h, w, big_r, spacing, elong, lobule, rng)
    if not nuclei:
        epi, lumen, nuclei = glands(h, w, big_r, spacing, elong, np.ones_like(lobule), rng)
    emap = emap * (1 - epi) + 0.55 * epi
    emap *= 1 - 0.9 * lumen
    hmap += 0.1 * epi * (1 - lumen)
    xs, ys, angles = (np.concatenate(v) for v in zip(*nuclei))
    n = len(xs)
    draw_nuclei(hmap, xs, ys, r * rng.uniform(0.9, 1.1, n), r * rng.uniform(0.75, 0.95, n), angles,
                rng.uniform(0.8, 0.95, n))
    n_fib = int(cells * (0.3 + 1.4 * density) * h * w / (28 * px) ** 2)
    draw_nuclei(hmap, rng.uniform(0, w, n_fib), rng.uniform(0, h, n_fib), np.full(n_fib, 1.6 * r),
                np.full(n_fib, 0.45 * r), rng.uniform(-25, 25, n_fib), rng.uniform(0.6, 0.9, n_fib))
    if density < 0.98:
        empty = fat(h, w, px, 1 - density, epi == 0, rng)
        emap[empty], hmap[empty] = 0.03, 0.0
    return hmap, emap


TUMOUR = {  # nucleus size, coverage, arrangement
    "DC": (1.0, (0.55, 0.85), "sheet"), "LC": (0.75, (0.45, 0.7), "cords"),
    "MC": (1.0, (0.25, 0.45), "mucin"), "PC": (1.05, (0.45, 0.7), "fronds"),
}


def tumour_mask(h, w, px, arrangement, coverage, rng):
    field = smooth_noise(h, w, 70 * px, rng)
    if arrangement == "fronds":
        field = 0.5 * field + 0.5 * cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), 4 * px + 1,
                                                     sigmaY=20 * px + 1)
        field = (field - field.min()) / (np.ptp(field) + 1e-6)
    return field > np.quantile(field, 1 - coverage)


def add_tumour(hmap, emap, px, code, expression, rng):
    """Tumour nests of dense, disordered, pleomorphic nuclei over a share of the field set by the expression."""
    size, (lo, hi), arrangement = TUMOUR[code]
    h, w = hmap.shape
    base = stroma(h, w, px, rng)
    mask = tumour_mask(h, w, px, arrangement, expression * rng.uniform(lo, hi), rng)
    if arrangement == "mucin":
        pool = ~mask & (smooth_noise(h, w, 80 * px, rng) > 1 - 0.7 * expression)
        emap[pool], hmap[pool] = 0.25 * base[pool], 0.12
    r = 2.3 * px * size * (0.7 + 0.3 * expression)
    spacing = 2.3 * r if arrangement != "cords" else 3.2 * r
    n = int(h * w / spacing ** 2)
    xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
    if arrangement == "cords":
        ys = np.round(ys / spacing) * spacing + rng.normal(0, 0.2 * r, n)
        xs, ys = rotate(xs, ys, w, h, rng.uniform(0, 180))
    inside = mask[np.clip(ys.astype(int), 0, h - 1), np.clip(xs.astype(int), 0, w - 1)]
    xs, ys = xs[inside], ys[inside]
    k = len(xs)
    scale = r * rng.lognormal(0, 0.1 + 0.2 * expression, k)
    emap[mask], hmap[mask] = 0.75 * base[mask], 0.18
    draw_nuclei(hmap, xs, ys, scale, scale * rng.uniform(0.55, 1.0, k), rng.uniform(0, 180, k),
                rng.uniform(0.9, 1.5, k))
    if r >= 6:
        j = rng.random(k) < 0.3
        draw_nuclei(hmap, xs[j], ys[j], np.full(j.sum(), 0.18 * r), np.full(j.sum(), 0.18 * r),
                    np.zeros(j.sum()), np.full(j.sum(), 1.8))


def rotate(xs, ys, w, h, angle):
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    x, y = xs - w / 2, ys - h / 2
    return w / 2 + x * c - y * s, h / 2 + x * s + y * c


def tissue(h, w, px, row, rng):
    """Hematoxylin and eosin density maps: the host's benign tissue, tumour over it as the expression says."""
    hmap, emap = benign_field(h, w, px, row["host"], row["density"], rng)
    if row["expression"] <= 0:
        return hmap, emap
    code = row["subtype_code"] if row["class_name"] == "malignant" else "DC"
    add_tumour(hmap, emap, px, code, row["expression"], rng)
    return hmap, emap


def stain(seed, row):
    """H&E colours of the row's patient: jittered stain vectors scaled by its latent strengths, and brightness."""
    rng = np.random.default_rng([seed, zlib.crc32(row["patient_id"].encode())])
    jitter = 0.06 * DIFFICULTY[row["difficulty"]]["nuisance"]
    h_vec = np.abs(H_VEC + rng.normal(0, jitter, 3))
    e_vec = np.abs(E_VEC + rng.normal(0, jitter, 3))
    colors = dict(h=h_vec / np.linalg.norm(h_vec) * row["hematoxylin"], e=e_vec / np.linalg.norm(e_vec) * row["eosin"],
                  bg=rng.uniform(0.02, 0.08, 3), gain=np.full(1, row["brightness"]))
    return {k: v.astype(np.float32) for k, v in colors.items()}


def render(row, seed=0):
    """One RGB uint8 image for a plan row."""
    rng = np.random.default_rng([seed, zlib.crc32(row["file"].encode())])
    width, height = int(row["width"]), int(row["height"])
    w = min(max(width, RENDER_WIDTH[0]), RENDER_WIDTH[1])
    h = int(round(w * height / width))
    px = ZOOM[row["magnification"]] * w / 700
    hmap, emap = tissue(h, w, px, row, rng)
    hmap = cv2.GaussianBlur(hmap, (0, 0), 0.35 * px + 0.3)
    colors = stain(seed, row)
    od = [hmap * colors["h"][c] + emap * colors["e"][c] + colors["bg"][c] for c in range(3)]
    img = np.dstack([np.exp(-d) for d in od]) * colors["gain"]
    if (w, h) != (width, height):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if width < w else cv2.INTER_LINEAR)
    noise = rng.random((height, width, 1), dtype=np.float32) * 8 - 4
    return np.clip(255 * img + noise, 0, 255).astype(np.uint8)


def target(root, layout, relpath, file):
    root = Path(root)
    if layout == "flat":
        return root / file
    if layout == "kaggle":
        return root / "BreaKHis_v1" / "BreaKHis_v1" / relpath
    if layout == "tarball":
        return root / "BreaKHis_v1" / relpath
    raise PipelineError(f"unknown synthetic layout {layout!r}; choose tarball, kaggle or flat")


def write_rows(rows, root, layout, seed):
    for row in rows:
        path = target(root, layout, row["relpath"], row["file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        _, buf = cv2.imencode(".png", cv2.cvtColor(render(row, seed), cv2.COLOR_RGB2BGR),
                              [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, 3])
        path.write_bytes(buf.tobytes())
    return len(rows)


def make_synthetic(root, preset="demo", seed=0, layout="tarball", difficulty=None, **overrides):
    """Write a synthetic BreakHis tree under root and return root; difficulty None takes the preset's."""
    root = Path(root)
    workers = overrides.pop("workers", 0) or len(os.sched_getaffinity(0))
    if difficulty:
        overrides["difficulty"] = difficulty
    files = plan(preset, seed, **overrides)
    target(root, layout, "x", "x")
    root.mkdir(parents=True, exist_ok=True)
    level = files["difficulty"].iloc[0]
    (root / MARKER).write_text(f"Synthetic BreakHis-like images (preset={preset}, seed={seed}, difficulty={level}); "
                               f"not real data.\n")
    rows = files.to_dict("records")
    if len(rows) < 300 or workers == 1:
        write_rows(rows, root, layout, seed)
        return root
    chunks = [rows[i::workers * 8] for i in range(workers * 8)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(write_rows, chunks, [root] * len(chunks), [layout] * len(chunks), [seed] * len(chunks)))
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--preset", default="demo", choices=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="tarball", choices=["tarball", "kaggle", "flat"])
    parser.add_argument("--difficulty", default=None, choices=list(DIFFICULTY),
                        help="how hard the class is to see (default: the preset's; tiny is easy, demo and full default)")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    make_synthetic(args.root, args.preset, args.seed, args.layout, args.difficulty, workers=args.workers)
    level = args.difficulty or PRESETS[args.preset]["difficulty"]
    n = len(plan(args.preset, args.seed, difficulty=level))
    print(f"{n} images ({args.preset}, {level}) written under {args.root} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
