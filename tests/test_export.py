"""ONNX export: metadata, a dynamic batch, the magnification mask as an input, and onnxruntime against torch."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import main
from stages.training.checkpoint import load_model
from stages.inference.predictor import OnnxModel
from config import Config
from stages.training.data import index_bank, split_frames
from stages.inference.predictor import onnx_predictor, score
from stages.training.runs import REFERENCE
from tests.conftest import copy_output
from utils.helpers import PipelineError

TOLERANCE = 1e-4


def export(cfg, *extra):
    return main.main(["--stages", "export", "--output-dir", cfg.output_dir, "--batch-size", "4", *extra])


@pytest.fixture(scope="module")
def exported(fixed_output, tmp_path_factory):
    cfg = copy_output(fixed_output, tmp_path_factory.mktemp("export") / "output")
    assert export(cfg) == 0
    return cfg, Path(cfg.output_dir) / "models" / "best_model.onnx"


def fixed_test_tuples(cfg):
    pred = pd.read_csv(Path(cfg.output_dir) / "runs" / REFERENCE / "fixed" / "predictions.csv", dtype={"patient_id": str})
    return pred[(pred["level"] == "tuple") & (pred["role"] == "test")].reset_index(drop=True)


def test_metadata_carries_what_inference_needs(exported):
    cfg, path = exported
    meta = OnnxModel(path).meta
    ckpt = torch.load(Path(cfg.output_dir) / "models" / "best_model.pth", weights_only=False)
    assert meta["classes"]["subtype"] == ckpt["classes"]["subtype"]
    assert meta["magnifications"] == ckpt["magnifications"] and meta["image_size"] == ckpt["image_size"]
    assert meta["field"] == ckpt["field"] and meta["field"][1] > meta["field"][0]
    for key in ("mean", "std"):
        assert meta["normalization"][key] == pytest.approx(ckpt["normalization"][key])
    assert meta["threshold"] == pytest.approx(ckpt["threshold"])
    assert meta["runs"][0]["digest"] == ckpt["record"]["digest"] and meta["runs"][0]["run"] == "mmnet"
    assert meta["parity"]["on"] == "fixed split test tuples"
    assert meta["parity"]["tuples"] == len(fixed_test_tuples(cfg))
    assert meta["parity"]["max_abs_prob"] < TOLERANCE


def test_onnxruntime_reproduces_the_fixed_evaluation(exported):
    """The graph's probabilities on the fixed test tuples are those the evaluation wrote to predictions.csv."""
    cfg, path = exported
    index, parts = split_frames(cfg, "fixed")
    bank = index_bank(cfg, index)
    tuples, _ = score(onnx_predictor(path), parts["test"], bank, 5, torch.device("cpu"))
    expected = fixed_test_tuples(cfg).set_index("tuple_id")["prob_malignant"]
    gap = np.abs(tuples.set_index("tuple_id")["prob_malignant"] - expected.loc[tuples["tuple_id"]].to_numpy())
    print(f"onnxruntime vs evaluation: {len(tuples)} tuples, max |dP| {gap.max():.2e}")
    assert len(tuples) == len(expected) and gap.max() < TOLERANCE


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_dynamic_batch_and_the_mask_is_an_input(exported, batch):
    cfg, path = exported
    model, ckpt = load_model(Path(cfg.output_dir) / "models" / "best_model.pth")
    session = OnnxModel(path).session
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, 3, *ckpt["field"], generator=gen)
    assert ckpt["field"][1] > ckpt["field"][0] == cfg.image_size
    mask = torch.ones(batch, 4, dtype=torch.bool)
    mask[:, 1] = False
    feeds = lambda m: {"images": x.numpy(), "mask": m.numpy()}  # noqa: E731
    prob, _, weights = session.run(None, feeds(mask))
    full, _, _ = session.run(None, feeds(torch.ones_like(mask)))
    with torch.no_grad():
        want = torch.sigmoid(model(x, mask)["binary_logits"]).numpy()
    assert prob.shape == (batch,) and np.abs(prob - want).max() < TOLERANCE
    assert np.all(weights[:, 1] == 0) and not np.allclose(prob, full)


def test_ensemble_export_is_the_mean_of_its_members(exported):
    cfg, _ = exported
    models = Path(cfg.output_dir) / "models"
    ckpt = torch.load(models / "best_model.pth", weights_only=False)
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() and "running_" not in k else v
             for k, v in ckpt["model"].items()}
    (models / "checkpoints").mkdir(exist_ok=True)
    torch.save(ckpt, models / "checkpoints" / f"{REFERENCE}_fold_0.pth")
    torch.save(dict(ckpt, model=other, threshold={"youden": 0.2, "sens95": 0.1, "decision": 0.2}),
               models / "checkpoints" / f"{REFERENCE}_fold_1.pth")
    assert export(cfg, "--ensemble") == 0
    path = models / f"{REFERENCE}_fold_ensemble.onnx"
    meta = OnnxModel(path).meta
    assert len(meta["members"]) == 2
    assert meta["threshold"]["youden"] == pytest.approx((ckpt["threshold"]["youden"] + 0.2) / 2)
    members = [load_model(models / "checkpoints" / f"{REFERENCE}_fold_{k}.pth")[0] for k in (0, 1)]
    x = torch.randn(4, 4, 3, *ckpt["field"])
    mask = torch.ones(4, 4, dtype=torch.bool)
    with torch.no_grad():
        probs = [torch.sigmoid(m(x, mask)["binary_logits"]).numpy() for m in members]
    prob = OnnxModel(path).session.run(None, {"images": x.numpy(), "mask": mask.numpy()})[0]
    assert not np.allclose(probs[0], probs[1], atol=1e-3)
    assert np.abs(prob - np.mean(probs, 0)).max() < TOLERANCE


def test_missing_checkpoint_and_bad_onnx_are_named(exported, tmp_path, capsys):
    cfg, _ = exported
    assert export(cfg, "--checkpoint", str(tmp_path / "none.pth")) == 2
    assert "--checkpoint" in capsys.readouterr().out
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(PipelineError, match="not a usable ONNX model"):
        onnx_predictor(tmp_path / "bad.onnx")


def test_export_and_distill_run_only_when_asked():
    assert not {"export", "distill"} & set(main.stage_list(Config()))
    assert main.stage_list(replace(Config(), stages=("export", "fixed", "distill"))) == ["fixed", "distill", "export"]
