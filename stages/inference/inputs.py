"""New images for the predict stage: files listed as analyze finds them, labels from names, checked and decoded."""
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from preprocess.analyze import IMAGE_EXTS, find_base, list_files, parse_name, validate
from preprocess.cache import decode_into, log_fallbacks
from preprocess.tuples import ImageBank

JUNK = {"thumbs.db", "desktop.ini"}


def input_files(inputs):
    """(files, problems): every file under each input folder (located as analyze does) and each named file."""
    files, problems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
            continue
        if not path.is_dir():
            problems.append((str(path), "does not exist"))
            continue
        found = [f for f in list_files(find_base(path)) if f.name.lower() not in JUNK and not f.name.startswith(".")]
        if not found:
            problems.append((str(path), "empty folder: no files in it"))
        files += found
    return list(dict.fromkeys(Path(os.path.abspath(f)) for f in files)), problems


def image_row(path, mags):
    """Labels from a BreakHis name; any other image is its own patient at the magnification of its folder, or the
    model's first magnification."""
    info = parse_name(path.name)
    if info is not None:
        return dict(info, path=str(path), note="")
    folder = path.parent.name.upper()
    mag = folder if folder in mags else mags[0]
    why = "its folder" if folder in mags else "assumed, unknown"
    return dict(path=str(path), file=path.name, label=-1, class_name="", subtype_code="", subtype="", slide_id="",
                patient_id=path.stem, magnification=mag, seq=0, note=f"not a BreakHis name: own patient at {mag} ({why})")


def own_patients(rows):
    """Files that are their own patient keep their stem as patient id, numbered where it is already taken."""
    taken = Counter(r["patient_id"] for r in rows if r["label"] >= 0)
    for r in rows:
        if r["label"] >= 0:
            continue
        taken[r["patient_id"]] += 1
        if taken[r["patient_id"]] > 1:
            r["patient_id"] = f"{r['patient_id']}~{taken[r['patient_id']]}"
    return rows


def collect(inputs, mags):
    """(rows of the readable images, problems [(path, why)], left out [(path, why)]): listing, names, duplicates."""
    files, problems = input_files(inputs)
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    problems += [(str(f), f"not an image file (expected {', '.join(IMAGE_EXTS)})") for f in files if f not in images]
    rows, seen, left_out = [], {}, []
    for f in images:
        row = image_row(f, mags)
        key = row["file"].upper() if row["label"] >= 0 else row["path"]
        if row["magnification"] not in mags or key in seen:
            why = f"a copy of {seen[key]}" if key in seen else f"{row['magnification']} is not read by this model"
            left_out.append((str(f), why))
            continue
        seen[key] = f
        rows.append(row)
    reasons = validate([r["path"] for r in rows])
    problems += [(r["path"], f"unreadable image ({why})") for r, why in zip(rows, reasons) if why]
    return own_patients([r for r, why in zip(rows, reasons) if not why]), problems, left_out


def decode_all(paths, shape, stain_norm):
    """(fields (N, height, width, 3) uint8, reason per path where decoding failed, '' where it worked): the training
    decode (each field at its own aspect, fitted to `shape`), Macenko fallbacks counted in the log."""
    out = np.zeros((len(paths), *shape, 3), np.uint8)
    failed = []
    kept = decode_into(out, paths, shape, stain_norm, failed)
    reasons = [""] * len(paths)
    for i, why in failed:
        reasons[i] = why
    log_fallbacks([k for k, r in zip(kept, reasons) if not r], stain_norm)
    return out, reasons


def index_frame(rows, classes):
    """The rows as an index frame; subtypes outside the model's classes become its 'Other' group."""
    frame = pd.DataFrame(rows)
    if rows:
        other = "Other" if "Other" in classes else ""
        frame["subtype_group"] = frame["subtype"].where(frame["subtype"].isin(list(classes) + [""]), other)
    return frame


def load_images(inputs, mags, shape, stain_norm, classes):
    """(index frame of the decoded images of magnifications `mags`, their ImageBank at field `shape`, problems, left
    out) for the model's settings."""
    rows, problems, left_out = collect(inputs, mags)
    images, reasons = decode_all([r["path"] for r in rows], shape, stain_norm)
    problems += [(r["path"], why) for r, why in zip(rows, reasons) if why]
    rows = [r for r, why in zip(rows, reasons) if not why]
    images = images[np.array([not why for why in reasons], dtype=bool)]
    return index_frame(rows, classes), ImageBank(images, {r["path"]: i for i, r in enumerate(rows)}), problems, left_out
