"""Drawing the synthetic tissue: glands, stroma, fat, tumour nests and H&E staining at one magnification's scale."""
import zlib

import cv2
import numpy as np

ZOOM = {"40X": 1.0, "100X": 2.5, "200X": 5.0, "400X": 10.0}
H_VEC = np.array([0.65, 0.70, 0.29])
E_VEC = np.array([0.07, 0.99, 0.11])
RENDER_WIDTH = (256, 384)
DIFFICULTY = {  # malignant strength range, share of patients with the cue at low / at high magnification only,
    # share of fields showing it at their other magnifications, most benign-looking fields of a malignant patient and
    # most malignant-looking fields of a benign one (each patient draws its share up to these), nuisance scale
    "easy": dict(strength=(0.8, 1.0), focus=(0.0, 0.0), off=1.0, blank=0.0, flip=0.0, nuisance=0.3),
    "default": dict(strength=(0.3, 1.0), focus=(0.4, 0.4), off=0.1, blank=0.5, flip=0.25, nuisance=0.5),
    "hard": dict(strength=(0.25, 0.8), focus=(0.45, 0.45), off=0.05, blank=0.6, flip=0.3, nuisance=1.0),
}


def latent(seed, key, salt):
    """Random generator for one patient or one file, independent of the rest of the plan."""
    return np.random.default_rng([seed, zlib.crc32(key.encode()), salt])


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
    img = np.exp(-(hmap[..., None] * colors["h"] + emap[..., None] * colors["e"] + colors["bg"])) * colors["gain"]
    if (w, h) != (width, height):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if width < w else cv2.INTER_LINEAR)
    noise = rng.random((height, width, 1), dtype=np.float32) * 8 - 4
    return np.clip(255 * img + noise, 0, 255).astype(np.uint8)
