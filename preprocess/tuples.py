"""Magnification tuples (one image per magnification from one patient group) and the resident image bank."""
import numpy as np
import pandas as pd
import torch

from preprocess.cache import image_cache
from preprocess.transforms import prepare
from utils.env import fits_on_gpu


def group_of(rows):
    """Patient key plus subtype code, so a stem filed under two subtypes never mixes them in one tuple."""
    return rows["patient_id"].astype(str) + "_" + rows["subtype_code"].astype(str)


def subtype_names(rows):
    return rows["subtype_group"] if "subtype_group" in rows else rows["subtype"]


def groups(index_rows, magnifications):
    """One dict per patient group with its images per magnification in sequence order."""
    rows = index_rows.assign(group=group_of(index_rows), subtype_label=subtype_names(index_rows))
    out = []
    for group, g in rows.sort_values(["group", "magnification", "seq", "path"]).groupby("group", sort=True):
        first = g.iloc[0]
        paths = {m: g.loc[g["magnification"] == m, "path"].astype(str).tolist() for m in magnifications}
        out.append(dict(group=group, patient_id=str(first["patient_id"]), label=int(first["label"]),
                        subtype_label=str(first["subtype_label"]), paths=paths))
    return out


def tuple_frame(records, magnifications):
    columns = ["tuple_id", "patient_id", "group", "label", "subtype_label"] + [f"path_{m}" for m in magnifications]
    return pd.DataFrame(records, columns=columns)


def eval_tuples(index_rows, magnifications, reads=None):
    """Deterministic tuples: with n the largest image count of a group, tuple i takes image i mod n_m of each mag.
    For a model that reads one magnification (`reads`), one tuple per distinct image of it (the first holding it),
    so each of its images counts once in its patient's mean."""
    records = []
    for g in groups(index_rows, magnifications):
        n = max(len(p) for p in g["paths"].values())
        for i in range(n):
            paths = [g["paths"][m][i % len(g["paths"][m])] if g["paths"][m] else "" for m in magnifications]
            records.append([f"{g['group']}#{i}", g["patient_id"], g["group"], g["label"], g["subtype_label"], *paths])
    frame = tuple_frame(records, magnifications)
    if reads is None or len(reads) != 1:
        return frame
    return frame.drop_duplicates(["group", f"path_{reads[0]}"]).reset_index(drop=True)


def draw_tuples(group_list, magnifications, per_group, rng):
    """Fresh random training tuples: `per_group` per patient group, each image drawn within the group."""
    records = []
    for g in group_list:
        picks = {m: rng.integers(0, len(g["paths"][m]), per_group) if g["paths"][m] else None for m in magnifications}
        for i in range(per_group):
            paths = [g["paths"][m][picks[m][i]] if picks[m] is not None else "" for m in magnifications]
            records.append([f"{g['group']}#r{i}", g["patient_id"], g["group"], g["label"], g["subtype_label"], *paths])
    return tuple_frame(records, magnifications)


def tuple_rows(tuples, magnifications, row_of):
    """Cache row of every image of every tuple, (N, M) int, -1 where a magnification is missing."""
    cols = [[clean_path(p) for p in tuples[f"path_{m}"]] for m in magnifications]
    return np.array([[row_of[p] if p else -1 for p in col] for col in cols], dtype=np.int64).reshape(
        len(magnifications), len(tuples)).T.copy()


def batches_of(rows, labels, subtypes, batch_size, drop_single=False):
    out = []
    for start in range(0, len(rows), batch_size):
        end = min(start + batch_size, len(rows))
        if drop_single and end - start == 1 and start > 0:
            break
        out.append((rows[start:end], labels[start:end], subtypes[start:end]))
    return out


class TrainBatches:
    """Sampler of shuffled batches of fresh random tuples, redrawn each epoch from (seed, epoch)."""

    def __init__(self, index_rows, magnifications, row_of, classes, per_group, batch_size, seed):
        self.mags, self.row_of, self.classes = tuple(magnifications), row_of, list(classes)
        self.group_list = groups(index_rows, self.mags)
        self.per_group, self.batch_size, self.seed, self.epoch = per_group, batch_size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def tuples(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        drawn = draw_tuples(self.group_list, self.mags, self.per_group, rng)
        return drawn.iloc[rng.permutation(len(drawn))].reset_index(drop=True)

    def __iter__(self):
        t = self.tuples()
        rows = tuple_rows(t, self.mags, self.row_of)
        subtypes = t["subtype_label"].map(self.classes.index).to_numpy()
        return iter(batches_of(rows, t["label"].to_numpy(), subtypes, self.batch_size, drop_single=True))

    def __len__(self):
        n = len(self.group_list) * self.per_group
        full, rest = divmod(n, self.batch_size)
        return full + (rest > 1 or (rest == 1 and full == 0))


def eval_batches(tuples, magnifications, row_of, classes, batch_size):
    """Batches of deterministic tuples in frame order; classes a list of subtype names."""
    rows = tuple_rows(tuples, magnifications, row_of)
    subtypes = tuples["subtype_label"].map(lambda s: classes.index(s) if s in classes else -100).to_numpy()
    return batches_of(rows, tuples["label"].to_numpy(), subtypes, batch_size)


def clean_path(value):
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)

class Resident:
    """Data held once per device: `place(device)` decides where (the device when it has room), `on` remembers it."""

    placed: dict

    def on(self, device):
        key = str(device)
        if key not in self.placed:
            self.placed[key] = self.place(device)
        return self.placed[key]

    def place(self, device):
        raise NotImplementedError


class ImageBank(Resident):
    """The decoded uint8 cache (N, S, S, 3) held once: on the GPU when it fits, else pinned host memory or RAM."""

    def __init__(self, images, row_of, source=""):
        self.host = torch.from_numpy(np.array(images))
        self.row_of = row_of
        self.source = source
        self.placed = {}

    def place(self, device):
        if device.type != "cuda":
            return self.host
        return self.host.to(device) if fits_on_gpu(self.host.nbytes, device) else self.host.pin_memory()

    def gather(self, rows, device):
        """Images (B, M, S, S, 3) uint8 and presence mask (B, M) of a batch of cache rows (-1 = missing) on `device`."""
        images = self.on(device)
        index = torch.as_tensor(rows, device=images.device)
        x = images[index.clamp_min(0)]
        x[index < 0] = 0
        return x.to(device, non_blocking=True), (index >= 0).to(device, non_blocking=True)

    def batch(self, rows, device, train, normalization):
        """Model inputs (B, M, 3, S, S) normalised for the backbone, augmented when training, and the mask."""
        return prepare(*self.gather(rows, device), device, train=train, **normalization)


_BANKS = {}


def image_bank(paths, size, stain_norm, folder):
    """The ImageBank of `paths` at `size` px, Macenko normalised or not, cached in `folder` (built on first use, then
    shared by every run of the process)."""
    arr, target, row_of = image_cache(paths, size, stain_norm, folder)
    if str(target) not in _BANKS:
        _BANKS.clear()
        _BANKS[str(target)] = ImageBank(arr, row_of, str(target))
    return _BANKS[str(target)]
