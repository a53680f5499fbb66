"""Several backbone stages at once (--feature-stage 2,-1): parsing, old checkpoints, the models, every stage and
predict in frozen, fine-tuned and probe-then-fine-tune mode."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import main
from backbones import build_model, encoders
from backbones.common import ModelConfig, feature_backbone
from config import Config
from tests.conftest import prepared_output
from tests.test_pipeline import flags
from tests.test_predict import copy_into, evaluation, fixed_test_images, outputs, predict
from utils.checks import check_config
from tests.conftest import model_settings
from utils.helpers import PipelineError, read_json

CNN = "test_efficientnet"
MAGS = ("40X", "100X")
MODES = {"frozen": ["--freeze-backbone"], "tuned": []}


def channels(stages):
    return feature_backbone(ModelConfig(**model_settings(feature_stage=stages))).feature_info.channels()


def test_a_stage_list_parses():
    assert main.resolve_config(["--feature-stage", "2,-1"]).feature_stage == (2, -1)
    assert main.resolve_config(["--feature-stage", "2"]).feature_stage == (2,)
    assert Config().feature_stage == (-1,)
    with pytest.raises(PipelineError, match="--feature-stage 2,2"):
        check_config(replace(Config(), feature_stage=(2, 2)))
    last = len(channels((0, 1, 2, 3, 4))) - 1
    with pytest.raises(PipelineError, match="twice"):
        channels((last, -1))


@pytest.mark.parametrize("name", ["mmnet", "simple_concat", "single_mag"])
def test_each_model_reads_every_listed_stage(name):
    torch.manual_seed(0)
    slots = MAGS[:1] if name == "single_mag" else MAGS
    model = build_model(name, **model_settings(magnifications=slots, num_subtypes=3, feature_stage=(2, -1)))
    assert model.num_features == sum(channels((2, -1))) > sum(channels((-1,)))
    x = torch.randn(2, len(MAGS), 3, 64, 64)
    out = model(x)
    out["binary_logits"].sum().backward()
    middle = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    deep_blocks = {n.split(".blocks.")[1].split(".")[0] for n in middle if ".blocks." in n}
    assert len(deep_blocks) > 1
    if name == "mmnet":
        assert len(model.branches) == 2 * len(MAGS) and len(model.pools) == 2
        assert any(n.startswith("pools.0.") for n in middle) and any(n.startswith("pools.1.") for n in middle)


def test_a_frozen_pretrained_cnn_reads_a_middle_stage_unless_told(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    frozen = ["--freeze-backbone", "--backbone", CNN]
    assert main.resolve_config(frozen).feature_stage == encoders.FROZEN_CNN_STAGE == (2,)
    assert main.resolve_config(frozen + ["--no-pretrained", "--pretrained-path", str(weights)]).feature_stage == (2,)
    assert main.resolve_config(frozen + ["--feature-stage", "-1"]).feature_stage == (-1,)
    assert main.resolve_config(frozen + ["--no-pretrained"]).feature_stage == (-1,)
    assert main.resolve_config(["--backbone", CNN]).feature_stage == (-1,)
    assert main.resolve_config(["--freeze-backbone", "--backbone", "vit_small_patch16_224"]).feature_stage == (-1,)
    config = tmp_path / "config.json"
    config.write_text('{"feature_stage": [-1], "freeze_backbone": true}')
    assert main.resolve_config(["--config", str(config), "--backbone", CNN]).feature_stage == (-1,)


def test_a_middle_stage_backbone_is_cut_after_it():
    def size(net):
        return sum(p.numel() for p in net.parameters())
    torch.manual_seed(0)
    uncut = timm.create_model(CNN, pretrained=False, features_only=True, out_indices=(2,)).eval()
    cut = feature_backbone(ModelConfig(**model_settings(feature_stage=(2,))))
    assert size(cut) < size(uncut) == size(feature_backbone(ModelConfig(**model_settings())))
    missing, _ = cut.load_state_dict(uncut.state_dict(), strict=False)
    assert not missing
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(cut.eval()(x)[0], uncut(x)[0])
    cut.train()(x)[0].sum().backward()
    assert all(p.grad is not None for p in cut.parameters())


@pytest.mark.parametrize("mode", list(MODES))
def test_a_stage_list_runs_every_stage_and_predict(mode, make_cfg, tmp_path):
    cfg = make_cfg(output_dir=str(tmp_path / "out"), epochs=2)
    args = flags(cfg, ",".join(main.DEFAULT)) + ["--folds", "0", "--feature-stage", "2,-1"] + MODES[mode]
    assert main.main(args) == 0
    out = Path(cfg.output_dir)
    run = out / "runs" / "mmnet" / "fixed"
    ckpt = torch.load(out / "models" / "best_model.pth", weights_only=False)
    assert tuple(ckpt["model_kwargs"]["feature_stage"]) == (2, -1)
    assert any(k.startswith("pools.1.") for k in ckpt["model"])
    assert (out / "plots" / "gradcam").exists() and any((out / "plots" / "gradcam").iterdir())
    if mode == "frozen":
        probe = read_json(out / "runs" / "linear_probe" / "fold_0" / "metrics.json")["probe"]
        assert probe["n_features"] == sum(channels((2, -1)))
    folder = copy_into(tmp_path / "new_patients", fixed_test_images(run))
    assert predict(replace(cfg, output_dir=str(out)), [folder]) == 0
    _, patients, _ = outputs(replace(cfg, output_dir=str(out)), "new_patients")
    expected = evaluation(run).query("level == 'patient'").set_index("patient_id")
    patients = patients.set_index("patient_id")
    np.testing.assert_allclose(patients["prob_malignant"], expected.loc[patients.index, "prob_malignant"], atol=1e-4)
    assert pd.read_csv(out / "tables" / "table_1_cross_validation_k_fold_results.csv").shape[0] > 0


def test_probe_then_fine_tune_reads_a_stage_list(tmp_path_factory, tiny_root):
    from stages.training.features import extractor
    from stages.training.run import run_one
    from stages.training.runs import RunSpec
    from utils.helpers import run_dir
    cfg = prepared_output(tmp_path_factory, tiny_root, "lpft_stages", epochs=2, frozen_epochs=1, feature_stage=(2, -1))
    metrics = run_one(cfg, RunSpec("lpft", "mmnet", "cv", {}), "fold_0")
    assert np.isfinite(metrics["test"]["patient"]["t0.5"]["auc"])
    last = torch.load(run_dir(cfg, "lpft", "fold_0") / "checkpoints" / "last.pth", weights_only=False)
    frozen = extractor(cfg).state_dict()
    assert any(not torch.equal(last["model"][f"backbones.0.{k}"], v) for k, v in frozen.items() if v.is_floating_point())
