"""Magnification tuples, the image cache and the batch augmentation."""
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from preprocess.cache import cache_folder, field_shape, fit_field, image_cache, macenko
from preprocess.transforms import augment, orient, prepare, tta_views
from preprocess.tuples import (ANY, ImageBank, TrainBatches, draw_tuples, eval_batches, eval_tuples, groups,
                               slot_labels)
from tests.conftest import SAMPLES

MAGS = ("40X", "100X", "200X", "400X")



def image_row(pid, code, label, mag, seq):
    return dict(path=f"/d/{pid}_{code}_{mag}_{seq}.png", patient_id=pid, subtype_code=code, label=label,
                subtype_group={"F": "fibroadenoma", "DC": "ductal_carcinoma", "LC": "Other"}[code],
                magnification=mag, seq=seq)


@pytest.fixture
def index():
    """Patient A: 3/1/2/0 images per magnification (400X missing), seqs out of order; stem B under DC and LC."""
    rows = [image_row("A", "F", 0, "40X", s) for s in (3, 1, 2)]
    rows += [image_row("A", "F", 0, "100X", 7), image_row("A", "F", 0, "200X", 5), image_row("A", "F", 0, "200X", 4)]
    rows += [image_row("B", code, 1, m, 1) for code in ("DC", "LC") for m in MAGS]
    rows += [image_row("B", "DC", 1, "40X", 2)]
    return pd.DataFrame(rows)


def test_eval_tuples_cover_every_image_in_sequence_order(index):
    t = eval_tuples(index, MAGS)
    used = set(np.concatenate([t[f"path_{m}"].to_numpy() for m in MAGS])) - {""}
    assert used == set(index["path"])
    a = t[t["group"] == "A_F"].reset_index(drop=True)
    assert len(a) == 3
    assert list(a["path_40X"]) == [f"/d/A_F_40X_{s}.png" for s in (1, 2, 3)]
    assert list(a["path_100X"]) == ["/d/A_F_100X_7.png"] * 3
    assert list(a["path_200X"]) == [f"/d/A_F_200X_{s}.png" for s in (4, 5, 4)]
    assert list(a["path_400X"]) == ["", "", ""]


def test_a_stem_under_two_subtypes_gives_two_groups_never_mixed(index):
    t = eval_tuples(index, MAGS)
    b = t[t["patient_id"] == "B"]
    assert sorted(b["group"].unique()) == ["B_DC", "B_LC"]
    for _, row in b.iterrows():
        code = row["group"].split("_")[1]
        assert all(f"_{code}_" in row[f"path_{m}"] for m in MAGS)
    assert set(b.loc[b["group"] == "B_LC", "subtype_label"]) == {"Other"}


def test_training_tuples_are_drawn_within_the_group_and_change_each_epoch(index):
    g = groups(index, MAGS)
    first = draw_tuples(g, MAGS, 6, np.random.default_rng([0, 1]))
    again = draw_tuples(g, MAGS, 6, np.random.default_rng([0, 1]))
    other = draw_tuples(g, MAGS, 6, np.random.default_rng([0, 2]))
    assert first.equals(again)
    assert not first.equals(other)
    assert first.groupby("group").size().tolist() == [6, 6, 6]
    for _, row in first.iterrows():
        paths = [row[f"path_{m}"] for m in MAGS if row[f"path_{m}"]]
        assert all(p.startswith(f"/d/{row['group']}_") for p in paths)
    assert (first.loc[first["group"] == "A_F", "path_400X"] == "").all()


def test_batches_load_cached_images_with_a_mask_for_missing_magnifications(index, tmp_path):
    paths = index["path"].tolist()
    images = np.stack([np.full((8, 8, 3), i + 1, dtype=np.uint8) for i in range(len(paths))])
    np.save(tmp_path / "c.npy", images)
    row_of = {p: i for i, p in enumerate(paths)}
    classes = ["ductal_carcinoma", "fibroadenoma", "Other"]
    bank = ImageBank(np.load(tmp_path / "c.npy", mmap_mode="r"), row_of)
    t = eval_tuples(index, MAGS)
    rows, labels, subtypes = eval_batches(t, MAGS, row_of, classes, 64)[0]
    x, mask = bank.gather(rows, torch.device("cpu"))
    assert x.shape == (len(t), 4, 8, 8, 3) and x.dtype == torch.uint8
    assert mask.tolist() == [[p != "" for p in row] for row in t[[f"path_{m}" for m in MAGS]].values.tolist()]
    assert (x[~mask] == 0).all() and (x[mask] > 0).all()
    assert labels.tolist() == t["label"].tolist()
    assert subtypes.tolist() == [classes.index(s) for s in t["subtype_label"]]
    sampler = TrainBatches(index, MAGS, row_of, classes, per_group=5, batch_size=4, seed=0)
    sampler.set_epoch(1)
    sizes = [len(b[0]) for b in sampler]
    assert sum(sizes) == 15 and len(sizes) == len(sampler)


def write_png(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_cache_decodes_once_and_is_rebuilt_when_a_source_file_changes(make_cfg, tmp_path):
    cfg = make_cfg(cache_dir=str(tmp_path / "cache"), image_size=16)
    files = sorted(SAMPLES.glob("*.png"))[:3]
    paths = []
    for f in files:
        shutil.copy(f, tmp_path / f.name)
        paths.append(str(tmp_path / f.name))
    shape = (16, 24)
    arr, file, rows = image_cache(paths, shape, cfg.stain_norm, cache_folder(cfg))
    assert isinstance(arr, np.memmap) and arr.shape == (3, 16, 24, 3) and arr.dtype == np.uint8
    expected = cv2.resize(cv2.cvtColor(cv2.imread(paths[1]), cv2.COLOR_BGR2RGB), (24, 16), interpolation=cv2.INTER_AREA)
    assert np.array_equal(arr[rows[paths[1]]], expected)
    write_png(paths[1], np.zeros((40, 60, 3), dtype=np.uint8))
    os.utime(paths[1], ns=(1, 10**18))
    arr2, file2, rows2 = image_cache(paths, shape, cfg.stain_norm, cache_folder(cfg))
    assert file2 != file and not file.exists()
    assert arr2[rows2[paths[1]]].max() == 0
    assert np.array_equal(arr2[0], arr[0])
    stained, file3, _ = image_cache(paths, shape, True, cache_folder(cfg))
    assert "macenko" in file3.name and file2.exists()
    assert stained.shape == arr2.shape and not np.array_equal(stained[0], arr2[0])


def test_macenko_normalises_tissue_and_leaves_background_alone():
    rgb = cv2.cvtColor(cv2.imread(str(sorted(SAMPLES.glob("*.png"))[0])), cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (128, 84))
    out, why = macenko(rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8 and why == ""
    assert not np.array_equal(out, rgb)
    blank = np.full((32, 32, 3), 245, dtype=np.uint8)
    assert np.array_equal(macenko(blank)[0], blank) and macenko(blank)[1] == "background"
    one_cell = np.full((3, 3, 3), 250, dtype=np.uint8)
    one_cell[1, 1] = (120, 60, 150)
    assert np.array_equal(macenko(one_cell)[0], one_cell)


def test_macenko_fallbacks_are_counted_in_the_log(tmp_path, monkeypatch):
    from preprocess import cache
    lines = []
    monkeypatch.setattr(cache, "log", lines.append)
    real = sorted(SAMPLES.glob("*.png"))[0]
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((40, 60, 3), 245, dtype=np.uint8))
    cache.build_cache([str(real), str(blank), str(blank)], tmp_path / "images.npy", (32, 48), True)
    assert lines == ["Macenko stain normalisation: 1 of 3 images normalised; left as they are: 2 background"]


def test_augmentation_is_independent_per_image_and_adds_no_noise():
    torch.manual_seed(0)
    grey = torch.full((2, 4, 3, 16, 16), 0.5)
    out = augment(grey.clone(), 16)
    flat = out.reshape(8, 3, -1)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-5)
    assert len({round(float(v), 5) for v in flat[:, 0, 0]}) == 8
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 1, 16).expand(1, 4, 3, 16, 16).contiguous()
    images = (ramp * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()
    mask = torch.tensor([[True, True, False, True]])
    x, _ = prepare(images, mask, torch.device("cpu"), train=True)
    assert x.shape == (1, 4, 3, 16, 16)
    assert (x[0, 2] == 0).all() and (x[0, 0] != 0).any()
    assert [v.shape for v in tta_views(x)] == [x.shape] * 4


def test_fields_keep_their_aspect_ratio_from_the_file_to_the_model():
    assert field_shape([700, 700, 700], [460, 460, 456], 224) == (224, 341)
    assert field_shape([460], [700], 224) == (341, 224)
    field = np.zeros((456, 700, 3), np.uint8)
    field[:, 345:355] = 255  # a vertical bar at the centre stays a bar of the same relative width
    out = fit_field(field, (224, 341))
    assert out.shape == (224, 341, 3)
    bar = np.flatnonzero(out[112, :, 0] > 127)
    assert abs(bar.mean() - 170) <= 1 and 3 <= len(bar) <= 7
    images = torch.zeros((2, 4, 16, 24, 3), dtype=torch.uint8)
    mask = torch.ones((2, 4), dtype=torch.bool)
    assert prepare(images, mask, torch.device("cpu"), train=False)[0].shape == (2, 4, 3, 16, 24)
    assert prepare(images, mask, torch.device("cpu"), train=True)[0].shape == (2, 4, 3, 16, 16)


def test_training_views_never_turn_a_field_by_a_quarter_turn():
    """A pattern that varies only along the width still varies only along the width after augmentation, as in the
    test-time views: training and evaluation see one set of orientations."""
    torch.manual_seed(0)
    ramp = torch.linspace(0.2, 0.8, 24).view(1, 1, 1, 1, 24).expand(3, 4, 3, 16, 24).contiguous()
    out = augment(ramp, 16)
    assert out.shape == (3, 4, 3, 16, 16)
    assert torch.allclose(out, out[..., :1, :].expand_as(out), atol=1e-4)
    assert not torch.allclose(out, out[..., :1].expand_as(out), atol=1e-3)
    views = tta_views(ramp)
    assert len(views) == 4 and all(v.shape == ramp.shape for v in views)
    assert all(torch.allclose(v, v[..., :1, :].expand_as(v)) for v in views)
    assert torch.equal(orient(orient(ramp, 3), 3), ramp)


def test_slots_of_one_magnification_take_distinct_fields(index):
    slots = ("40X",) * 4
    assert slot_labels(slots) == ["40X_1", "40X_2", "40X_3", "40X_4"]
    t = eval_tuples(index, slots)
    b = t[t["group"] == "B_DC"]
    assert len(b) == 1 and sorted(b.iloc[0][[f"path_40X_{i}" for i in range(1, 5)]]) == sorted(
        ["/d/B_DC_40X_1.png", "/d/B_DC_40X_2.png"] * 2)
    drawn = draw_tuples(groups(index, slots), slots, 5, np.random.default_rng(0))
    for _, row in drawn[drawn["group"] == "A_F"].iterrows():
        assert len({row[f"path_40X_{i}"] for i in range(1, 4)}) == 3


def test_the_any_slot_scores_every_image_once(index):
    t = eval_tuples(index, (ANY,))
    assert sorted(t["path_any"]) == sorted(index["path"])
    assert t.groupby("group").size().to_dict() == {"A_F": 6, "B_DC": 5, "B_LC": 4}
    pooled = eval_tuples(index, (ANY,), pool=("40X",))
    assert set(pooled["path_any"]) == set(index.loc[index["magnification"] == "40X", "path"])
