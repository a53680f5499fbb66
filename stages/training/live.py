"""Live training curves: one run's per-epoch scalars through TensorBoard, under output/tensorboard/<run>/<split>/."""
import numpy as np
from torch.utils.tensorboard import SummaryWriter

from preprocess.tuples import slot_labels
from utils.helpers import is_finite, output_path

SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "auc/val_patient": "val_auc",
           "auc/val_tuple": "val_auc_tuple", "accuracy/train": "train_acc", "accuracy/val": "val_acc",
           "learning_rate": "lr"}


def curves_dir(cfg, name, split):
    return output_path(cfg, "tensorboard", name, split)


class Curves:
    """A SummaryWriter for one run (nothing with --no-tensorboard); a resumed run overwrites the epochs it repeats."""

    def __init__(self, cfg, run, last_epoch=0):
        self.mags = slot_labels(run.slots)
        self.writer = None
        if cfg.tensorboard:
            self.writer = SummaryWriter(str(curves_dir(cfg, run.name, run.split)), purge_step=last_epoch + 1)

    def epoch(self, row, val=None):
        """The epoch's history row, and the mean learned magnification weight over the validation tuples."""
        if self.writer is None:
            return
        step = int(row["epoch"])
        for tag, key in SCALARS.items():
            if is_finite(row.get(key)):
                self.writer.add_scalar(tag, float(row[key]), step)
        weights = None if val is None else val.get("mag_weights")
        if weights is not None and weights.size and np.isfinite(weights).any():
            for mag, w in zip(self.mags, np.nanmean(weights, axis=0)):
                self.writer.add_scalar(f"magnification_weight/{mag}", float(w), step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
