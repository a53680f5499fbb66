"""Live training curves: a run's epochs in TensorBoard event files, equal to its history.csv; --no-tensorboard writes
none."""
from dataclasses import replace

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stages.training.live import curves_dir
from stages.training.run import run_one
from stages.training.runs import REFERENCE, RunSpec
from tests.conftest import prepared_output
from utils.helpers import run_dir


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_root):
    return prepared_output(tmp_path_factory, tiny_root, "curves", epochs=2)


def test_each_epoch_is_written_and_equals_the_history(prepared):
    run_one(prepared, RunSpec("curves", REFERENCE, "cv"), "fold_0")
    events = EventAccumulator(str(curves_dir(prepared, "curves", "fold_0")))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/train", "loss/val", "auc/val_tuple", "learning_rate"}
    expected |= {f"magnification_weight/{m}" for m in prepared.magnifications}
    assert expected <= tags
    history = pd.read_csv(run_dir(prepared, "curves", "fold_0") / "history.csv")
    for tag, column in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("learning_rate", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == history["epoch"].tolist()
        assert [s.value for s in scalars] == pytest.approx(history[column].tolist(), rel=1e-5)
    weights = [events.Scalars(f"magnification_weight/{m}")[-1].value for m in prepared.magnifications]
    assert sum(weights) == pytest.approx(1.0, abs=1e-3)


def test_no_tensorboard_writes_no_event_files(prepared):
    cfg = replace(prepared, tensorboard=False)
    run_one(cfg, RunSpec("quiet", REFERENCE, "cv"), "fold_0")
    assert (run_dir(cfg, "quiet", "fold_0") / "metrics.json").exists()
    assert not curves_dir(cfg, "quiet", "fold_0").exists()
