"""Training engine: metrics glue, losses, schedule, resume, checkpoints, the non-finite loss guard."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from tests.conftest import model_settings, prepared_output
from utils import metrics as M
from utils.helpers import PipelineError



@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_root):
    return prepared_output(tmp_path_factory, tiny_root, "trainer", epochs=3)


def test_metrics_equal_scikit_learn():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2, 0.55, 0.3, 0.7, 0.35])
    m = M.binary_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    rng = np.random.default_rng(0)
    for yy, pp in [(rng.integers(0, 2, 30), rng.random(30)) for _ in range(20)] + [(y, np.ones(10)), (y, np.zeros(10))]:
        got, pred = M.binary_metrics(yy, pp, 0.5), (pp >= 0.5).astype(int)
        for name, f in [("accuracy", skm.accuracy_score), ("balanced_accuracy", skm.balanced_accuracy_score),
                        ("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)]:
            expected = f(yy, pred) if name in ("accuracy", "balanced_accuracy") else f(yy, pred, zero_division=0)
            assert got[name] == pytest.approx(expected), name
    assert np.isnan(M.binary_metrics(np.ones(5), np.full(5, 0.7))["balanced_accuracy"])
    fpr, tpr, thr = skm.roc_curve(y, p)
    assert M.youden_threshold(y, p) == pytest.approx(thr[np.argmax(tpr - fpr)])
    assert skm.recall_score(y, p >= M.sensitivity_threshold(y, p, 0.95)) >= 0.95
    ys, ps = np.array([0, 1, 2, 2, 1, 0, 2]), np.array([0, 2, 2, 2, 1, 1, 0])
    s = M.subtype_metrics(ys, ps, ["a", "b", "c"])
    assert s["macro_f1"] == pytest.approx(skm.f1_score(ys, ps, average="macro"))
    assert s["micro_f1"] == pytest.approx(skm.f1_score(ys, ps, average="micro"))
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(ys, ps))
    assert s["per_class"]["c"]["recall"] == pytest.approx(skm.recall_score(ys, ps, average=None)[2])


def test_youden_without_a_threshold_better_than_chance_is_0_5():
    y, p = np.array([1, 1, 0, 0]), np.array([0.43, 0.56, 0.51, 0.65])
    fpr, tpr, _ = skm.roc_curve(y, p)
    assert (tpr - fpr).max() <= 0
    assert M.youden_threshold(y, p) == 0.5
    assert M.youden_threshold(np.array([1, 0, 1, 0]), np.array([0.9, 0.2, 0.7, 0.6])) == pytest.approx(0.7)


def test_patient_level_is_the_mean_over_the_patients_tuples():
    frame = pd.DataFrame(dict(patient_id=["a", "a", "b", "a", "b"], label=[1, 1, 0, 1, 0],
                              prob_malignant=[0.2, 0.8, 0.1, 0.5, 0.4]))
    pl = M.patient_level(frame).set_index("patient_id")
    assert pl.loc["a", "prob_malignant"] == pytest.approx(0.5)
    assert pl.loc["b", "prob_malignant"] == pytest.approx(0.25)
    assert pl["n_tuples"].to_dict() == {"a": 3, "b": 2}


def test_losses_weight_the_rare_classes_more():
    from torchvision.ops import sigmoid_focal_loss
    from utils.losses import Criterion, class_balanced_weights, focal_alpha
    assert focal_alpha([1, 1, 1, 0]) == pytest.approx(0.25)
    w = class_balanced_weights([300, 30, 0, 3])
    assert w[2] == 0 and w[0] < w[1] < w[3]
    assert float(w[[0, 1, 3]].mean()) == pytest.approx(1.0)
    logits, labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    out = dict(binary_logits=logits, subtype_logits=torch.zeros(3, 4))
    loss = Criterion(0.25, w, gamma=2.0, subtype_weight=0.0)(out, labels, torch.tensor([0, 1, 3]))
    assert loss == pytest.approx(float(sigmoid_focal_loss(logits, labels, 0.25, 2.0, "mean")))
    both = Criterion(0.25, w, gamma=2.0, subtype_weight=0.5)(out, labels, torch.tensor([0, 1, 3]))
    assert both == pytest.approx(float(loss) + 0.5 * np.log(4), rel=1e-5)
    unseen = Criterion(0.25, w, gamma=2.0, subtype_weight=0.5)(out, labels, torch.tensor([2, 2, 2]))
    assert unseen == pytest.approx(float(loss))


def test_warmup_then_cosine():
    from stages.training.train import lr_factor
    f = [lr_factor(s, 5, 50) for s in range(50)]
    assert f[0] < f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))
    assert f[-1] < 0.05


def history_of(cfg, run_name):
    from utils.helpers import run_dir
    return pd.read_csv(run_dir(cfg, run_name, "fold_0") / "history.csv")


def interrupt(epoch, state):
    if epoch == 1:
        raise KeyboardInterrupt


def spec(name):
    from stages.training.runs import REFERENCE, RunSpec
    return RunSpec(name, REFERENCE, "cv")


def test_resume_continues_an_interrupted_run_to_the_same_end(prepared):
    from stages.training.run import run_one
    with pytest.raises(KeyboardInterrupt):
        run_one(prepared, spec("stopped"), "fold_0", callback=interrupt)
    assert history_of(prepared, "stopped")["epoch"].tolist() == [1]
    epochs = []
    run_one(replace(prepared, resume=True), spec("stopped"), "fold_0", callback=lambda e, s: epochs.append(e))
    assert epochs == [2, 3]
    run_one(prepared, spec("straight"), "fold_0")
    resumed, straight = history_of(prepared, "stopped"), history_of(prepared, "straight")
    assert resumed["epoch"].tolist() == straight["epoch"].tolist() == [1, 2, 3]
    cols = ["train_loss", "val_loss", "val_auc_tuple"]
    assert np.allclose(resumed[cols].to_numpy(), straight[cols].to_numpy(), atol=1e-5)


def test_resume_with_another_configuration_names_the_differences(prepared):
    from stages.training.run import run_one
    with pytest.raises(KeyboardInterrupt):
        run_one(prepared, spec("mismatch"), "fold_0", callback=interrupt)
    changed = replace(prepared, resume=True, image_size=48, backbone="test_resnet")
    with pytest.raises(PipelineError, match="trained under other settings") as info:
        run_one(changed, spec("mismatch"), "fold_0")
    assert "backbone test_efficientnet -> test_resnet" in str(info.value) and "image_size 32 -> 48" in str(info.value)


def test_checkpoint_of_another_configuration_gives_a_clear_message(prepared, tmp_path):
    from backbones import build_model
    from types import SimpleNamespace
    from stages.training.checkpoint import checkpoint, load_model, save
    kwargs = model_settings(magnifications=prepared.magnifications, num_subtypes=3)
    meta = SimpleNamespace(model_name="mmnet", model_kwargs=kwargs, classes=["a", "b", "c"],
                           bank=SimpleNamespace(shape=(32, 48)))
    save(checkpoint(build_model("mmnet", **kwargs), meta, prepared, 1, 0.5), tmp_path / "a.pth")
    other = SimpleNamespace(model_name="mmnet", model_kwargs=dict(kwargs, backbone="test_resnet", num_subtypes=4),
                            classes=["a", "b", "c", "d"], bank=SimpleNamespace(shape=(64, 96)))
    expect = checkpoint(build_model("mmnet", **other.model_kwargs), other, replace(prepared, image_size=64), 0, 0)
    with pytest.raises(PipelineError) as info:
        load_model(tmp_path / "a.pth", expect=expect)
    message = str(info.value)
    for field in ("backbone", "num_subtypes", "image_size", "subtype_classes"):
        assert field in message
    assert "state_dict" not in message
    model, ckpt = load_model(tmp_path / "a.pth")
    assert ckpt["normalization"]["mean"] and ckpt["image_size"] == prepared.image_size


def test_non_finite_losses_skip_steps_then_stop_the_run(prepared, monkeypatch):
    from stages.training.run import run_one
    from utils.losses import Criterion

    calls = []

    def nan_loss(criterion, out, labels, subtypes, *inputs):
        calls.append(1)
        return out["binary_logits"].sum() * float("nan")

    monkeypatch.setattr(Criterion, "__call__", nan_loss)
    with pytest.raises(PipelineError, match="3 steps had a non-finite loss"):
        run_one(replace(prepared, max_bad_steps=3), spec("nan"), "fold_0")
    assert len(calls) == 3


def test_a_truncated_checkpoint_at_resume_is_a_clear_message(prepared):
    from stages.training.run import run_one
    from utils.helpers import run_dir
    with pytest.raises(KeyboardInterrupt):
        run_one(prepared, spec("truncated"), "fold_0", callback=interrupt)
    last = run_dir(prepared, "truncated", "fold_0") / "checkpoints" / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(PipelineError, match="damaged or incomplete") as info:
        run_one(replace(prepared, resume=True), spec("truncated"), "fold_0")
    assert "--force" in str(info.value)
    assert not (run_dir(prepared, "truncated", "fold_0") / ".lock").exists()
