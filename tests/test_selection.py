"""Weight selection rules: scores, EMA half-life, SWA averaging with BatchNorm recomputed, runs end to end."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from config import SELECTIONS, Config
from stages.training.selection import SCORES, Selection, ema_decay, recompute_batchnorm
from tests.conftest import prepared_output


def row(auc, loss=1.0):
    return dict(val_auc=auc, val_auc_tuple=auc, val_loss=loss)


def test_scores_rank_epochs_by_their_rule():
    history = [row(0.9, 0.5), row(0.6, 0.4)]
    assert SCORES["auc"](history, row(0.7)) < SCORES["auc"](history, row(0.8))
    assert SCORES["loss"](history, row(0.1, 0.3)) > SCORES["loss"](history, row(0.9, 0.6))
    smooth = SCORES["smooth"](history, row(0.6))[0]
    assert smooth == pytest.approx(np.mean([0.9, 0.6, 0.6]))
    assert SCORES["smooth"]([], row(float("nan")))[0] == -1.0


def test_ema_decay_halves_in_one_epoch():
    for steps in (1, 4, 66):
        assert ema_decay(steps) ** steps == pytest.approx(0.5)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        self.idle = torch.nn.BatchNorm1d(3)
        self.on_features = False

    def forward(self, x, mask=None):
        return self.used(x)


def test_swa_averages_the_second_half_and_recomputes_only_the_used_batchnorm():
    model = Tiny()
    cfg = replace(Config(), selection="swa", epochs=4)
    sel = Selection(cfg, model, 1)
    snapshots = []
    for epoch in range(1, 5):
        with torch.no_grad():
            model.used[0].weight.add_(1.0)
        sel.after_epoch(model, epoch)
        if epoch >= 3:
            snapshots.append(model.used[0].weight.clone())
    averaged = sel.average.module
    assert torch.allclose(averaged.used[0].weight, torch.stack(snapshots).mean(0))
    averaged.idle.running_mean.fill_(7.0)
    data = torch.randn(64, 3) * 3 + 2
    recompute_batchnorm(averaged, [(data[:32], None), (data[32:], None)])
    with torch.no_grad():
        hidden = averaged.used[0](data)
    assert torch.allclose(averaged.used[1].running_mean, hidden.mean(0), atol=1e-5)
    assert torch.all(averaged.idle.running_mean == 7.0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_root):
    return prepared_output(tmp_path_factory, tiny_root, "selection", epochs=2)


@pytest.mark.parametrize("rule", SELECTIONS)
def test_every_rule_trains_resumes_and_keeps_a_checkpoint(prepared, rule):
    from stages.training.run import run_one
    from stages.training.runs import RunSpec
    from utils.helpers import run_dir
    spec = RunSpec(f"sel_{rule}", "mmnet", "cv")
    cfg = replace(prepared, selection=rule)
    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, spec, "fold_0", callback=lambda e, s: (_ for _ in ()).throw(KeyboardInterrupt()))
    metrics = run_one(replace(cfg, resume=True), spec, "fold_0")
    assert metrics["epochs"] == 2
    assert (run_dir(cfg, spec.name, "fold_0") / "checkpoints" / "best.pth").exists()
    if rule == "swa":
        assert metrics["best_epoch"] == 2
