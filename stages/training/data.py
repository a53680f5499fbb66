"""One run's data: the split's rows per role, tuples and batches over the resident image bank, the loss weights."""
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from backbones import MODELS, model_config
from preprocess.analyze import load_index, subtype_classes
from preprocess.cache import cache_folder, field_shape
from preprocess.preprocess import load_split
from preprocess.tuples import ImageBank, TrainBatches, eval_batches, eval_tuples, groups, image_bank
from stages.training.features import FeatureBank, Pooled, feature_bank, pooled_features
from utils.checks import resource_errors
from utils.env import resolve_device
from utils.helpers import PipelineError, run_dir, warn
from utils.losses import Criterion, class_balanced_weights, focal_alpha


@dataclass
class RunData:
    """Everything one training run reads: model settings, its input slots, classes, tuples and batches per role,
    sampler, loss, and cached backbone features where it reads them."""
    name: str
    split: str
    folder: Path
    model_name: str
    model_kwargs: dict
    slots: tuple
    classes: list
    bank: ImageBank
    train_sampler: TrainBatches
    tuples: dict
    batches: dict
    criterion: Criterion
    features: FeatureBank | Pooled | None = None

    def inputs(self, model):
        """Where the model's batches come from: cached features while it reads them, else images."""
        return self.features if model.on_features else self.bank

    @property
    def tag(self):
        return f"{self.name}/{self.split}"


def reads_features(cfg, model_name):
    """Whether a run reads the frozen-backbone feature maps: models that can, under --freeze-backbone or
    --frozen-epochs (the linear probe reads pooled features instead)."""
    cls = MODELS[model_name]
    return cls.fit == "gradient" and cls.takes_features and (cfg.freeze_backbone or cfg.frozen_epochs > 0)


def index_bank(cfg, index):
    """The image bank of every image of the index, each field at its own aspect (short side --image-size)."""
    shape = field_shape(index["width"], index["height"], cfg.image_size)
    with resource_errors("the image cache", folder=cache_folder(cfg)):
        return image_bank(index["path"].astype(str).tolist(), shape, cfg.stain_norm, cache_folder(cfg))


def run_features(cfg, model_name, settings, bank):
    """What a run reads besides images: pooled features for the probe, maps for a frozen backbone, else None."""
    device = resolve_device(cfg.device)
    with resource_errors("the frozen-backbone feature cache", folder=cache_folder(cfg)):
        if MODELS[model_name].fit == "probe":
            return pooled_features(cfg, bank, device, settings.feature_stage)
        return feature_bank(cfg, bank, device) if reads_features(cfg, model_name) else None


def split_frames(cfg, split_name, split=None):
    """The index, and its rows per role ('train', 'val', 'test') of the saved split (or of `split`, an inner one)."""
    split = load_split(cfg, split_name) if split is None else split
    index = load_index(cfg)
    roles = dict(zip(split["patient_id"].astype(str), split["role"]))
    index = index.assign(patient_id=index["patient_id"].astype(str))
    role = index["patient_id"].map(roles)
    if role.isna().any():
        warn(f"{int(role.isna().sum())} images belong to patients missing from split '{split_name}'; left out")
    parts = {r: index[role == r] for r in ("train", "val", "test")}
    empty = [r for r, rows in parts.items() if rows.empty]
    if empty:
        raise PipelineError(f"split '{split_name}' has no {'/'.join(empty)} patients. Rerun the 'split' stage.")
    return index, parts


def make_criterion(cfg, train_groups, classes):
    """Class weight and class-balanced subtype weights from the training units (fixed tuples per group)."""
    labels = [g["label"] for g in train_groups]
    counts = Counter(g["subtype_label"] for g in train_groups)
    units = [counts.get(c, 0) * cfg.tuples_per_patient for c in classes]
    return Criterion(focal_alpha(labels), class_balanced_weights(units), cfg.focal_gamma, cfg.subtype_loss_weight,
                     cfg.label_smoothing)


def prepare_run(cfg, name, split_name, model_name, flags, split=None):
    """Everything one training run needs: tuples of the model's slots, batches over the image bank, sampler,
    criterion, model settings; `split` (patient roles) replaces the saved split of that name, for the inner models of
    a run."""
    index, parts = split_frames(cfg, split_name, split)
    classes = subtype_classes(index)
    settings = model_config(cfg, model_name, len(classes), **flags)
    slots, pool = tuple(settings.magnifications), tuple(cfg.magnifications)
    bank = index_bank(cfg, index)
    sampler = TrainBatches(parts["train"], slots, bank.row_of, classes, cfg.tuples_per_patient, cfg.batch_size,
                           cfg.seed, pool)
    tuples = {role: eval_tuples(rows, slots, pool) for role, rows in parts.items()}
    batches = {role: eval_batches(t, slots, bank.row_of, classes, cfg.batch_size) for role, t in tuples.items()}
    return RunData(name=name, split=split_name, folder=run_dir(cfg, name, split_name), model_name=model_name,
                   model_kwargs=asdict(settings), slots=slots, classes=classes, bank=bank,
                   train_sampler=sampler, tuples=tuples, batches=batches,
                   criterion=make_criterion(cfg, groups(parts["train"], slots, pool), classes),
                   features=run_features(cfg, model_name, settings, bank))

