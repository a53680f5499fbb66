"""Which weights a run keeps (--selection): the epoch of best validation patient AUC (auc), of its 3-epoch mean
(smooth), of lowest validation loss (loss), an exponential moving average of the weights validated each epoch (ema),
or the mean of the second half's epoch weights on a fixed schedule with BatchNorm statistics recomputed (swa)."""
import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from utils.helpers import is_finite

SMOOTH = 3


def finite(v, default=-1.0):
    return float(v) if is_finite(v) else default


def auc_score(history, row):
    """Patient AUC, ties broken by tuple AUC, then lower loss."""
    return finite(row["val_auc"]), finite(row["val_auc_tuple"]), -finite(row["val_loss"], 1e9)


def smooth_score(history, row):
    recent = [h["val_auc"] for h in history[-(SMOOTH - 1):]] + [row["val_auc"]]
    recent = [v for v in recent if v is not None and np.isfinite(v)]
    return finite(np.mean(recent) if recent else None), finite(row["val_auc_tuple"]), -finite(row["val_loss"], 1e9)


def loss_score(history, row):
    return -finite(row["val_loss"], 1e9), finite(row["val_auc"])


SCORES = dict(auc=auc_score, smooth=smooth_score, loss=loss_score, ema=auc_score, swa=auc_score)


def ema_decay(steps_per_epoch):
    """Per-step decay with a half-life of one epoch, whatever the epoch length."""
    return 0.5 ** (1 / max(1, steps_per_epoch))


class Selection:
    """The rule's running average (ema, swa) and its scoring; `kept(model)` is what is validated and saved."""

    def __init__(self, cfg, model, steps_per_epoch):
        self.rule = cfg.selection
        self.score = SCORES[self.rule]
        self.early_stop = self.rule != "swa"
        self.swa_start = cfg.epochs // 2 + 1
        self.average = None
        if self.rule == "ema":
            decay = ema_decay(steps_per_epoch)
            self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        if self.rule == "swa":
            self.average = AveragedModel(model)

    def after_step(self, model):
        if self.rule == "ema":
            self.average.update_parameters(model)

    def after_epoch(self, model, epoch):
        if self.rule == "swa" and epoch >= self.swa_start:
            self.average.update_parameters(model)

    def kept(self, model):
        if self.rule != "ema":
            return model
        self.average.module.on_features = model.on_features
        return self.average.module

    def state_dict(self):
        return None if self.average is None else self.average.state_dict()

    def load(self, state):
        if self.average is not None and state is not None:
            self.average.load_state_dict(state)


@torch.no_grad()
def recompute_batchnorm(model, batches):
    """BatchNorm running statistics of averaged weights, from one pass over training batches (cumulative mean)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, mask in batches:
        model(x, mask)
    for m, (momentum, state) in zip(norms, saved):
        m.momentum = momentum
        if int(m.num_batches_tracked) == 0:
            m.load_state_dict(state)
