"""Table 8: altered inputs reach the model as the stage says (a dropped magnification as a masked slot, a degraded
one in its own slot only), and the table pairs each condition with the clean input on the same patients."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from backbones import build_model
from config import MAGNIFICATIONS as MAGS
from preprocess.analyze import load_index
from preprocess.tuples import ImageBank, eval_batches, eval_tuples
from stages.training.robustness import ALTER, Altered, condition_inputs, conditions
from stages.report.altered_inputs import robustness_table
from stages.training.data import split_frames
from stages.training.evaluate import predict_all
from tests.conftest import model_settings, prepared_output


@pytest.fixture(scope="module")
def fold(tmp_path_factory, tiny_root):
    cfg = prepared_output(tmp_path_factory, tiny_root, "robust")
    index, parts = split_frames(cfg, "fold_0")
    paths = load_index(cfg)["path"].astype(str).tolist()
    images = np.random.default_rng(0).integers(0, 256, (len(paths), 112, 168, 3), dtype=np.uint8)
    return parts["test"], ImageBank(images, {p: i for i, p in enumerate(paths)})


def test_every_magnification_has_each_kind_of_alteration():
    names = conditions(MAGS)
    assert names[0] == "clean" and len(names) == 1 + 4 * len(MAGS) and len(set(names)) == len(names)
    assert conditions(("100X",)) == ["clean", "missing_100X", "blur_100X", "jpeg_100X", "stain_100X"]


def test_a_dropped_magnification_reaches_mmnet_as_a_masked_slot(fold):
    test, bank = fold
    rows, source = condition_inputs("missing_100X", test, MAGS, bank)
    assert source is bank and not (rows["magnification"] == "100X").any() and len(rows) < len(test)
    tuples = eval_tuples(rows, MAGS)
    assert set(tuples["patient_id"]) == set(test["patient_id"].astype(str))
    model = build_model("mmnet", **model_settings(num_subtypes=3))
    masks = []
    model.register_forward_pre_hook(lambda module, args: masks.append(args[1].clone()))
    pred = predict_all(model, tuples, MAGS, ["a", "b", "c"], source, torch.device("cpu"), 4)
    mask = torch.cat(masks)
    assert not mask[:, 1].any() and mask[:, [0, 2, 3]].any()
    assert (pred["mask_100X"] == 0).all() and np.allclose(pred["w_100X"], 0)
    assert np.allclose(pred[[f"w_{m}" for m in MAGS]].sum(1), 1, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(ALTER))
def test_a_degraded_magnification_changes_its_own_slot_only(fold, kind):
    test, bank = fold
    rows, source = condition_inputs(f"{kind}_200X", test, MAGS, bank)
    assert isinstance(source, Altered) and len(rows) == len(test)
    (batch, _, _), = list(eval_batches(eval_tuples(rows, MAGS), MAGS, bank.row_of, ["a"], 1000))
    norm = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    clean, mask = bank.batch(batch, torch.device("cpu"), False, norm)
    altered, same_mask = source.batch(batch, torch.device("cpu"), False, norm)
    assert torch.equal(mask, same_mask) and clean.shape == altered.shape
    changed = (altered - clean).abs().flatten(2).mean(2)
    assert torch.equal(altered[:, [0, 1, 3]], clean[:, [0, 1, 3]])
    assert (changed[mask[:, 2], 2] > 0.01).all()


def fold_file(folder, probs, condition, weight):
    n = len(probs["clean"])
    labels = np.arange(n) % 2
    return pd.DataFrame(dict(condition=condition, kind=condition.partition("_")[0],
                             magnification=condition.partition("_")[2], patient_id=[f"{folder.name}-{i}" for i in range(n)],
                             label=labels, prob_malignant=probs[condition], n_tuples=2,
                             **{f"w_{m}": weight if m == "100X" else (1 - weight) / 3 for m in MAGS}))


def fabricated_book(tmp_path, folds=3, n=24):
    """Three folds: clean scores that rank well, missing_40X identical to clean, stain_100X inverted, with the CMF
    weight of 100X falling from 0.4 to 0.1."""
    rng = np.random.default_rng(0)
    splits = {}
    for k in range(folds):
        folder = tmp_path / f"fold_{k}"
        folder.mkdir()
        labels = np.arange(n) % 2
        clean = np.clip(0.5 + 0.3 * (2 * labels - 1) + rng.normal(0, 0.2, n), 0.01, 0.99)
        probs = {"clean": clean, "missing_40X": clean, "stain_100X": 1 - clean}
        frame = pd.concat([fold_file(folder, probs, "clean", 0.4), fold_file(folder, probs, "missing_40X", 0.4),
                           fold_file(folder, probs, "stain_100X", 0.1)])
        frame.to_csv(folder / "robustness.csv", index=False)
        splits[folder.name] = dict(folder=folder, metrics=dict(threshold=dict(patient={})))
    return SimpleNamespace(runs={"mmnet": splits}, rule="fixed_0.5", bootstrap=200, seed=0, notes=[])


def test_table_pairs_each_condition_with_the_clean_input(tmp_path):
    book = fabricated_book(tmp_path)
    table = robustness_table(book).set_index("condition")
    assert list(table.index) == ["clean", "missing_40X", "stain_100X"]
    assert (table["n_patients"] == 72).all() and (table["n_folds"] == 3).all()
    same, flipped = table.loc["missing_40X"], table.loc["stain_100X"]
    assert same["auc_change"] == 0 and same["auc_change_ci_low"] == 0 and same["auc_change_ci_high"] == 0
    assert same["accuracy_change"] == 0
    clean_auc = table.loc["clean", "auc_mean"]
    assert clean_auc > 0.8 and flipped["auc_mean"] == pytest.approx(1 - clean_auc)
    assert flipped["auc_change"] == pytest.approx(1 - 2 * clean_auc) and flipped["auc_change_ci_high"] < 0
    assert flipped["accuracy"] < table.loc["clean", "accuracy"] and flipped["accuracy_change_ci_high"] < 0
    assert flipped["cmf_weight_clean"] == pytest.approx(0.4) and flipped["cmf_weight_altered"] == pytest.approx(0.1)
    assert any("simple_concat" in note for note in book.notes)


def test_a_fold_without_its_file_is_noted_and_left_out(tmp_path):
    book = fabricated_book(tmp_path)
    (tmp_path / "fold_2" / "robustness.csv").unlink()
    table = robustness_table(book)
    assert (table["n_folds"] == 2).all() and (table["n_patients"] == 48).all()
    assert any("fold_2" in note and "--stages robustness" in note for note in book.notes)
