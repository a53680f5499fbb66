"""A synthetic BreakHis: the real folder layout and file names, H&E-like tissue drawn with numpy/opencv.

Generative model. Each patient has a latent malignancy strength (zero when benign) and a focus: the magnifications
where its tumour shows (low: 40X and 100X, high: 200X and 400X, or all four; the others show it in few fields). A
field that shows it has an expression (the strength, jittered per image): the share of the field that tumour nests
(dense, large, pleomorphic nuclei) take over from benign tissue (glands lined by small round nuclei in pink stroma).
Each malignant patient has its own share of fields that look benign, each benign patient its own share of fields
that look malignant (atypia-like), so at the patient level the classes overlap.
Class-unrelated nuisance: stain colours and strengths and tissue density (fat spaces, stromal cells) per patient,
brightness per patient and magnification. Patient latents are stratified within each class, so every tree realises
the intended shares. The difficulty (easy / default / hard) sets all of these. Magnification sets the scale (40X:
many small structures, 400X: a few large nuclei). The plan (one row per file with its latent values) is separate
from the drawing, so a preset can be checked without writing images.
"""
import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from config import MAGNIFICATIONS
from preprocess.analyze import MARKER, SUBTYPES, stem_of
from preprocess.synthetic_tissue import DIFFICULTY, GLANDS, latent, render
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


def stratified(n, k, rng):
    """n x k uniforms; each column puts one value in each of n equal strata, in random order."""
    return (rng.random((n, k)).argsort(axis=0) + rng.random((n, k))) / n


def patient_traits(malignant, seed, level):
    """Latent values per patient, stratified within each class so that every tree realises the intended shares."""
    d = DIFFICULTY[level]
    (lo, hi), (p_low, p_high), nu = d["strength"], d["focus"], d["nuisance"]
    rng, mix = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 4])
    parts = []
    for cls, ids in malignant.groupby(malignant):
        u = stratified(len(ids), 6, rng)
        focus = np.where(u[:, 1] < p_low, "low", np.where(u[:, 1] < p_low + p_high, "high", "all"))
        parts.append(pd.DataFrame(dict(
            strength=cls * (lo + (hi - lo) * u[:, 0]), focus=focus if cls else "none",
            host=np.array(list(GLANDS))[(u[:, 2] * len(GLANDS)).astype(int)], density=1 - 0.5 * nu * u[:, 3],
            hematoxylin=1.6 + 0.3 * nu * (2 * u[:, 4] - 1), eosin=0.9 + 0.2 * nu * (2 * u[:, 5] - 1),
            **mixing(len(ids), cls, d, mix)), index=ids.index))
    return pd.concat(parts)


def mixing(n, malignant, d, rng):
    """Per patient, the share of fields against its class: benign-looking fields of a malignant patient (up to
    `blank`), malignant-looking fields of a benign one (up to `flip`); stratified, drawn apart from the other latents."""
    u = stratified(n, 1, rng)[:, 0]
    return dict(blank=d["blank"] * u * malignant, flip=d["flip"] * u * (1 - malignant))


def image_traits(files, seed, level):
    """Expression, tissue density and brightness (one per patient and magnification) of every image."""
    d = DIFFICULTY[level]
    sessions = files["patient_id"] + files["magnification"]
    light = {key: latent(seed, key, 3).uniform(-1, 1) for key in sessions.unique()}
    brightness = 1 + 0.1 * d["nuisance"] * sessions.map(light).to_numpy()
    u = np.array([latent(seed, f, 2).random(3) for f in files["file"]]).reshape(-1, 3)
    on = np.array([m in FOCUS[f] for m, f in zip(files["magnification"], files["focus"])])
    shows = np.where(on, u[:, 0] >= files["blank"], u[:, 0] < d["off"])
    strength = np.minimum(1.0, files["strength"] * (0.7 + 0.6 * u[:, 1]))
    malignant = files["class_name"].eq("malignant")
    expression = np.where(malignant, strength * shows, (u[:, 0] < files["flip"]) * (0.4 + 0.5 * u[:, 1]))
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
                        help="how hard the class is to see (default: the preset's: tiny easy, demo and full default)")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    make_synthetic(args.root, args.preset, args.seed, args.layout, args.difficulty, workers=args.workers)
    level = args.difficulty or PRESETS[args.preset]["difficulty"]
    n = len(plan(args.preset, args.seed, difficulty=level))
    print(f"{n} images ({args.preset}, {level}) written under {args.root} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
