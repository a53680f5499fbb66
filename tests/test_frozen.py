"""Frozen-backbone mode: the feature cache, models trained on cached maps, probe-then-fine-tune, the linear probe."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from config import Config
from tests.conftest import prepared_output


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_root):
    return prepared_output(tmp_path_factory, tiny_root, "frozen", epochs=3)


def spec(name, model="mmnet", **flags):
    from stages.training.runs import RunSpec
    return RunSpec(name, model, "cv", flags)


def test_cached_features_equal_the_backbone_on_each_view(prepared):
    from stages.training.data import prepare_run
    from backbones.common import normalization
    from preprocess.transforms import orient
    from stages.training.features import VIEWS, extractor
    cfg = replace(prepared, freeze_backbone=True)
    run = prepare_run(cfg, "f", "fold_0", "mmnet", {})
    net = extractor(cfg)
    rows = np.array([[0, 1], [2, -1]])
    x, mask = run.bank.batch(rows, torch.device("cpu"), False, normalization(cfg.backbone))
    for k in range(VIEWS):
        want = net(orient(x[0, :1], k))[-1][0]
        assert torch.allclose(run.features.image_maps(0, k)[-1], want, atol=2e-2, rtol=1e-2)
    feats, present = run.features.batch(rows, torch.device("cpu"), False)
    assert present.tolist() == [[True, True], [True, False]]
    assert float(feats[-1][1, 1].abs().sum()) == 0
    drawn = {int(run.features.batch(np.array([[3]]), torch.device("cpu"), True)[0][-1].sum() * 1e3) for _ in range(40)}
    assert len(drawn) > 1


def test_a_frozen_run_trains_only_the_head_and_its_checkpoint_reads_images(prepared):
    from stages.training.checkpoint import load_model
    from stages.training.data import prepare_run
    from stages.training.features import extractor
    from stages.training.forward import predict
    from stages.training.run import run_one
    from utils.helpers import run_dir
    cfg = replace(prepared, freeze_backbone=True)
    metrics = run_one(cfg, spec("frozen"), "fold_0")
    assert np.isfinite(metrics["test"]["patient"]["t0.5"]["accuracy"])
    model, _ = load_model(run_dir(cfg, "frozen", "fold_0") / "checkpoints" / "best.pth")
    frozen = extractor(cfg).state_dict()
    assert all(torch.equal(v, frozen[k]) for k, v in model.backbones[0].state_dict().items())
    run = prepare_run(cfg, "frozen", "fold_0", "mmnet", {})
    images = predict(model, run.bank, run.batches["test"], torch.device("cpu"))["prob"]
    features = predict(model.read_features(), run.features, run.batches["test"], torch.device("cpu"))["prob"]
    assert np.allclose(images, features, atol=2e-2)


def test_probe_then_fine_tune_unfreezes_the_backbone_after_the_frozen_epochs(prepared):
    from stages.training.features import extractor
    from stages.training.run import run_one
    from utils.helpers import run_dir
    cfg = replace(prepared, frozen_epochs=1, epochs=2, selection="swa")
    run_one(cfg, spec("lpft"), "fold_0")
    last = torch.load(run_dir(cfg, "lpft", "fold_0") / "checkpoints" / "last.pth", weights_only=False)
    frozen = extractor(cfg).state_dict()
    moved = [k for k, v in frozen.items() if v.is_floating_point() and not torch.equal(last["model"][f"backbones.0.{k}"], v)]
    assert moved, "the backbone never trained after the frozen epoch"


def test_the_feature_cache_is_built_once_and_reused(prepared):
    from stages.training import features
    from stages.training.data import prepare_run
    cfg = replace(prepared, freeze_backbone=True, feature_stage=(1,))
    run = prepare_run(cfg, "a", "fold_0", "mmnet", {})
    first = run.features
    folder = features.cache_folder(cfg)
    files = {p.name: p.stat().st_mtime_ns for p in folder.glob("features_*.npy")}
    features._FEATURES.clear()
    again = prepare_run(cfg, "b", "fold_1", "mmnet", {}).features
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("features_*.npy")} == files
    assert np.array_equal(first.store[:2], again.store[:2])
    deeper = prepare_run(replace(cfg, feature_stage=(-1,)), "c", "fold_0", "mmnet", {}).features
    assert deeper.shapes[0][0] != first.shapes[0][0]
    both = prepare_run(replace(cfg, feature_stage=(1, -1)), "d", "fold_0", "mmnet", {}).features
    assert both.shapes == first.shapes + deeper.shapes
    one, last, pair = (features.pooled_features(cfg, run.bank, torch.device("cpu"), s).values
                       for s in ((1,), (-1,), (1, -1)))
    assert len(one) == len(run.bank.host) and one.shape[1] == first.shapes[0][0]
    assert np.allclose(pair, np.concatenate([one, last], 1), atol=1e-3)


def test_the_linear_probe_scores_like_a_run_and_picks_c_on_validation(prepared):
    from stages.training.probe import C_GRID
    from stages.training.run import run_one
    from utils.helpers import run_dir
    metrics = run_one(prepared, spec("linear_probe", "linear_probe"), "fold_0")
    assert metrics["probe"]["C"] in C_GRID
    assert set(metrics["probe"]["oof_auc_by_C"]) == {f"{c:g}" for c in C_GRID}
    assert 0 <= metrics["test"]["patient"]["t0.5"]["auc"] <= 1
    import pandas as pd
    pred = pd.read_csv(run_dir(prepared, "linear_probe", "fold_0") / "predictions.csv")
    assert set(pred["level"]) == {"tuple", "patient"}
    assert pred["prob_malignant"].between(0, 1).all()


def test_frozen_mode_settings_that_contradict_each_other_are_refused():
    from utils.checks import check_config
    from utils.helpers import PipelineError
    with pytest.raises(PipelineError, match="--frozen-epochs"):
        check_config(replace(Config(), freeze_backbone=True, frozen_epochs=2))
    with pytest.raises(PipelineError, match="--frozen-epochs"):
        check_config(replace(Config(), frozen_epochs=30, epochs=30))
    with pytest.raises(PipelineError, match="--tta"):
        check_config(replace(Config(), freeze_backbone=True, tta=True))


def test_a_vit_trains_frozen_and_fine_tuned(prepared):
    from stages.training.run import run_one
    cfg = replace(prepared, backbone="vit_tiny_patch16_224", epochs=1)
    for name, frozen in (("vit_frozen", True), ("vit_tuned", False)):
        metrics = run_one(replace(cfg, freeze_backbone=frozen), spec(name), "fold_0")
        assert np.isfinite(metrics["test"]["tuple"]["t0.5"]["accuracy"])


def test_every_stage_runs_with_a_frozen_backbone_and_table_4_has_the_probe(tmp_path, make_cfg):
    import pandas as pd

    import main
    from tests.test_pipeline import flags
    cfg = make_cfg(output_dir=str(tmp_path / "out"))
    assert main.main(flags(cfg, ",".join(main.DEFAULT)) + ["--folds", "0", "--freeze-backbone"]) == 0
    table = pd.read_csv(tmp_path / "out" / "tables" / "table_4_baseline_comparison.csv")
    assert "linear_probe" in set(table["model"])
    assert (tmp_path / "out" / "runs" / "mmnet_fixed_ensemble" / "fixed" / "metrics.json").exists()
