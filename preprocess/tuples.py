"""Magnification tuples (the images of one sample, one per slot of the model that reads it, from one patient group)
and the resident image bank. A slot names the magnification its image comes from: MMNet's four slots are 40X, 100X,
200X and 400X, a single-magnification model's one slot its magnification, mmnet_fields_100X's four slots are all 100X
(four distinct fields), and the slot 'any' takes an image of any magnification (the magnification-independent
classifier)."""
from collections import Counter

import numpy as np
import pandas as pd
import torch

from config import MAGNIFICATIONS
from preprocess.cache import image_cache
from preprocess.transforms import prepare
from utils.env import fits_on_gpu

ANY = "any"


def group_of(rows):
    """Patient key plus subtype code, so a stem filed under two subtypes never mixes them in one tuple."""
    return rows["patient_id"].astype(str) + "_" + rows["subtype_code"].astype(str)


def subtype_names(rows):
    return rows["subtype_group"] if "subtype_group" in rows else rows["subtype"]


def slot_labels(slots):
    """The column label of each slot: its magnification, repeats numbered (100X_1 ... 100X_4), or 'any'."""
    counts, seen, labels = Counter(slots), Counter(), []
    for slot in slots:
        seen[slot] += 1
        labels.append(slot if counts[slot] == 1 else f"{slot}_{seen[slot]}")
    return labels


def groups(index_rows, slots, pool=MAGNIFICATIONS):
    """One dict per patient group with its images per magnification in sequence order; 'any' holds every image of
    the magnifications in `pool`, lowest magnification first."""
    rows = index_rows.assign(group=group_of(index_rows), subtype_label=subtype_names(index_rows))
    mags = list(dict.fromkeys([*pool, *(s for s in slots if s != ANY)]))
    out = []
    for group, g in rows.sort_values(["group", "magnification", "seq", "path"]).groupby("group", sort=True):
        first = g.iloc[0]
        paths = {m: g.loc[g["magnification"] == m, "path"].astype(str).tolist() for m in mags}
        paths[ANY] = [p for m in pool for p in paths[m]]
        out.append(dict(group=group, patient_id=str(first["patient_id"]), label=int(first["label"]),
                        subtype_label=str(first["subtype_label"]), paths=paths))
    return out


def tuple_frame(records, slots):
    columns = ["tuple_id", "patient_id", "group", "label", "subtype_label"] + [f"path_{s}" for s in slot_labels(slots)]
    return pd.DataFrame(records, columns=columns)


def eval_tuples(index_rows, slots, pool=MAGNIFICATIONS):
    """Deterministic tuples that see every image: with c slots of magnification m and n_m images of it, a group gives
    the largest ceil(n_m / c) tuples (at least one, masked where it has no image), and the j-th slot of m in tuple i
    takes image (i c + j) mod n_m. Four distinct magnifications: tuple i takes image i mod n_m of each; one slot: one
    tuple per image, so each image counts once in its patient's mean."""
    copies, records = Counter(slots), []
    for g in groups(index_rows, slots, pool):
        n = max([1] + [-(-len(g["paths"][m]) // c) for m, c in copies.items()])
        for i in range(n):
            paths = [pick(g["paths"][m], i * copies[m] + j) for m, j in slot_order(slots)]
            records.append([f"{g['group']}#{i}", g["patient_id"], g["group"], g["label"], g["subtype_label"], *paths])
    return tuple_frame(records, slots)


def slot_order(slots):
    """(magnification, how many slots of it came before) for each slot."""
    seen = Counter()
    out = []
    for slot in slots:
        out.append((slot, seen[slot]))
        seen[slot] += 1
    return out


def pick(paths, i):
    return paths[i % len(paths)] if paths else ""


def random_picks(n, per_group, copies, rng):
    """(per_group, copies) image indices in [0, n): distinct within a row where n allows, else every image before
    any repeats."""
    if copies == 1:
        return rng.integers(0, n, per_group)[:, None]
    order = np.argsort(rng.random((per_group, n)), axis=1)
    return order[:, np.arange(copies) % n]


def draw_tuples(group_list, slots, per_group, rng):
    """Fresh random training tuples: `per_group` per patient group, each image drawn within the group (the slots of one
    magnification get distinct images where the group has enough)."""
    copies, records = Counter(slots), []
    for g in group_list:
        picks = {m: random_picks(len(g["paths"][m]), per_group, c, rng) if g["paths"][m] else None
                 for m, c in copies.items()}
        for i in range(per_group):
            paths = [g["paths"][m][picks[m][i, j]] if picks[m] is not None else "" for m, j in slot_order(slots)]
            records.append([f"{g['group']}#r{i}", g["patient_id"], g["group"], g["label"], g["subtype_label"], *paths])
    return tuple_frame(records, slots)


def tuple_rows(tuples, slots, row_of):
    """Cache row of every image of every tuple, (N, slots) int, -1 where a slot has no image."""
    cols = [[clean_path(p) for p in tuples[f"path_{label}"]] for label in slot_labels(slots)]
    return np.array([[row_of[p] if p else -1 for p in col] for col in cols], dtype=np.int64).reshape(
        len(slots), len(tuples)).T.copy()


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

    def __init__(self, index_rows, slots, row_of, classes, per_group, batch_size, seed, pool=MAGNIFICATIONS):
        self.mags, self.row_of, self.classes = tuple(slots), row_of, list(classes)
        self.group_list = groups(index_rows, self.mags, pool)
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


def eval_batches(tuples, slots, row_of, classes, batch_size):
    """Batches of deterministic tuples in frame order; classes a list of subtype names."""
    rows = tuple_rows(tuples, slots, row_of)
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
    """The decoded uint8 cache of whole fields (N, H, W, 3) held once: on the GPU when it fits, else pinned host memory
    or RAM."""

    def __init__(self, images, row_of, source=""):
        self.host = torch.from_numpy(np.array(images))
        self.row_of = row_of
        self.source = source
        self.placed = {}

    def place(self, device):
        if device.type != "cuda":
            return self.host
        return self.host.to(device) if fits_on_gpu(self.host.nbytes, device) else self.host.pin_memory()

    @property
    def shape(self):
        """(height, width) of every field."""
        return tuple(self.host.shape[1:3])

    def gather(self, rows, device):
        """Fields (B, M, H, W, 3) uint8 and presence mask (B, M) of a batch of cache rows (-1 = missing) on
        `device`."""
        images = self.on(device)
        index = torch.as_tensor(rows, device=images.device)
        x = images[index.clamp_min(0)]
        x[index < 0] = 0
        return x.to(device, non_blocking=True), (index >= 0).to(device, non_blocking=True)

    def batch(self, rows, device, train, normalization):
        """Model inputs normalised for the backbone and the mask: augmented square crops (B, M, 3, S, S) when
        training, whole fields (B, M, 3, H, W) otherwise."""
        return prepare(*self.gather(rows, device), device, train=train, **normalization)


_BANKS = {}


def image_bank(paths, shape, stain_norm, folder):
    """The ImageBank of `paths` fitted to `shape` (height, width), Macenko normalised or not, cached in `folder`
    (built once, then shared by every run of the process)."""
    arr, target, row_of = image_cache(paths, shape, stain_norm, folder)
    if str(target) not in _BANKS:
        _BANKS.clear()
        _BANKS[str(target)] = ImageBank(arr, row_of, str(target))
    return _BANKS[str(target)]
