"""Every setting of the pipeline in one dataclass: its default, its kind, the values it accepts and what it does; each
field is a main.py flag."""
import os
from dataclasses import dataclass, field, fields

from rules import (Rule, alpha_list, backbone_name, boolean, choice, device_name, fold_list, fraction, image_side,
                   integer, name_list, number, path_list, path_or_empty, stage_indices, stage_list, subset, text,
                   three_fractions, timm_model)

MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
SELECTIONS = ("auc", "smooth", "loss", "ema", "swa")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SWITCHES = ("auto", "on", "off")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
THRESHOLD_RULES = ("fixed_0.5", "val_youden", "oof_youden")
TUNE_SCOPES = ("fixed", "per_fold")
# shaping: shapes what a run learns (its record's settings and digest); compute: how fast, never what a run learns;
# control: paths, stages, --force and the like; per_run: reaches a run only through its RunSpec
KINDS = ("shaping", "compute", "control", "per_run")


def setting(default, kind, rule, help):
    """A Config field with its kind (one of KINDS), its rule (what it accepts) and its --help line."""
    if kind not in KINDS:
        raise TypeError(f"setting kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(rule, Rule):
        raise TypeError(f"setting rule {rule!r} is not a rules.Rule")
    return field(default=default, metadata={"kind": kind, "rule": rule, "help": help})


@dataclass
class Config:
    # data and output
    data_root: str = setting("data", "control", text(),
        "where BreakHis is: any folder holding histology_slides/breast, or a flat folder of BreakHis-named images")
    output_dir: str = setting("output", "control", text(),
        "folder every stage reads from and writes to: index, splits, runs, models, tables, plots, report.html")
    demo: bool = setting(False, "control", boolean(),
        "CPU-sized settings on a generated BreakHis tree under data/synthetic; every output marked synthetic")
    synthetic: bool = setting(False, "control", boolean(),
        "mark every output as coming from generated images (console banner, config.json, report and paper tables)")
    seed: int = setting(42, "shaping", integer(0, 2**32 - 1),
        "seed of the patient splits, tuple draws, weight initialisation, subtype head, tuning sampler and bootstrap")
    magnifications: tuple = setting(MAGNIFICATIONS, "shaping", subset(MAGNIFICATIONS),
        "magnifications a tuple holds and the models read; also the single-magnification baselines and ablations run")
    image_size: int = setting(224, "shaping", image_side(),
        "short side in pixels every field is resized to, keeping its aspect ratio (700x460 -> 341x224); training crops are this square")
    stain_norm: bool = setting(False, "shaping", boolean(),
        "Macenko stain normalisation of every image as it is decoded; the checkpoint carries it to predict")
    cache_dir: str = setting("", "control", text(empty=True),
        "folder for the decoded-image and frozen-feature caches (empty: cache/ under --output-dir); safe to delete")
    subtype_min_images: int = setting(500, "shaping", integer(0),
        "subtypes with fewer images than this are merged into Other for the subtype head")
    # splits
    n_folds: int = setting(5, "shaping", integer(2),
        "number of patient-wise cross-validation folds; also the number of table 2's ensemble members")
    val_fraction: float = setting(0.15, "shaping", fraction(),
        "share of each CV fold's non-test patients (per class) held out as its validation patients")
    fixed_split: tuple = setting((0.70, 0.15, 0.15), "shaping", three_fractions(),
        "train,val,test shares of patients in the fixed split (stratified by class)")
    inner_folds: int = setting(5, "shaping", integer(2),
        "inner grouped folds over a run's train+val patients: the models behind oof_youden, and the probe's C")
    # model
    backbone: str = setting("mobilenetv4_conv_small", "shaping", backbone_name(),
        "image backbone of MMNet and the baselines: a timm model (CNN or ViT) or hf-hub:ORG/NAME")
    pretrained: bool = setting(True, "shaping", boolean(),
        "start the backbones from pretrained (ImageNet or hub) weights; --no-pretrained trains from random init")
    pretrained_path: str = setting("", "shaping", path_or_empty(
        "empty (weights from the hub) or an existing weights file", "missing/weights.pth"),
        "local weights file for --backbone, loaded instead of downloading (empty: weights from the hub)")
    feature_stage: tuple = setting((-1,), "shaping", stage_indices(),
        "backbone stage(s) the models read, e.g. 2 or 2,-1 (-1: last); blocks past the deepest one are dropped")
    freeze_backbone: bool = setting(False, "shaping", boolean(),
        "keep the backbone frozen throughout: models train on cached backbone features, only their own modules learn")
    frozen_epochs: int = setting(0, "shaping", integer(0),
        "train on frozen-backbone features for the first N epochs, then fine-tune the whole model (LP-FT; 0: off)")
    shared_backbone: bool = setting(True, "shaping", boolean(),
        "MMNet shares one backbone across magnifications; --no-shared-backbone gives each its own")
    drop_rate: float = setting(0.3, "shaping", number(0, 1, high_open=True),
        "dropout probability before the classification heads (and in the baselines' embedding MLP)")
    resnet_backbone: str = setting("resnet50", "per_run", timm_model(),
        "timm ResNet of the ImageNet-transfer baseline (resnet50_transfer), on the first magnification")
    # training
    epochs: int = setting(30, "shaping", integer(1),
        "training epochs per run (the most, when the selection rule stops early)")
    batch_size: int = setting(32, "shaping", integer(1),
        "tuples per batch in training, evaluation and prediction")
    lr: float = setting(3e-4, "shaping", number(0, low_open=True),
        "peak AdamW learning rate (warmup, then cosine decay); a pretrained backbone gets it x --backbone-lr-scale")
    backbone_lr_scale: float = setting(1.0, "shaping", number(0, low_open=True),
        "factor on --lr for a pretrained backbone's parameters (random init trains the backbone at --lr)")
    warmup_epochs: int = setting(2, "shaping", integer(0),
        "epochs of linear learning-rate warmup before the cosine decay")
    weight_decay: float = setting(0.05, "shaping", number(0),
        "AdamW weight decay on weight matrices and kernels (biases and norm layers get none)")
    grad_clip: float = setting(1.0, "shaping", number(0),
        "maximum gradient norm per optimiser step (0: no clipping)")
    accum_steps: int = setting(1, "shaping", integer(1),
        "batches whose gradients are summed per optimiser step (effective batch = batch size x this)")
    tuples_per_patient: int = setting(32, "shaping", integer(1),
        "random training tuples (one image per magnification) drawn per patient each epoch")
    focal_gamma: float = setting(0.0, "shaping", number(0),
        "focusing exponent of the class-weighted benign/malignant focal loss (0: weighted cross-entropy)")
    label_smoothing: float = setting(0.1, "shaping", number(0, 1, high_open=True),
        "benign/malignant targets pulled towards 1/2 by this much (patient labels on every field are noisy)")
    subtype_loss_weight: float = setting(0.5, "shaping", number(0),
        "weight of the subtype cross-entropy added to the benign/malignant loss (0: no subtype loss)")
    selection: str = setting("swa", "shaping", choice(SELECTIONS),
        "which weights a run keeps: swa averages the second half's epochs, auc/smooth/loss/ema pick by validation")
    patience: int = setting(8, "shaping", integer(1),
        "epochs without a better validation score before a run stops early (not under --selection swa)")
    max_bad_steps: int = setting(10, "shaping", integer(1),
        "steps with a non-finite loss a run may skip before it stops as diverged")
    # evaluation
    threshold_rule: str = setting("fixed_0.5", "shaping", choice(THRESHOLD_RULES),
        "decision threshold that leads the tables and decides in predict: 0.5, Youden on validation or on inner out-of-fold predictions, per level")
    tta: bool = setting(False, "shaping", boolean(),
        "evaluate on the mean over four views (flips, a quarter turn): thresholds, tables and predict all use it")
    smote: bool = setting(True, "shaping", boolean(),
        "refit the subtype head on SMOTE-balanced training embeddings and report it beside the plain head")
    bootstrap: int = setting(1000, "control", integer(0),
        "patient resamples behind the report's 95% confidence intervals and paired AUC-difference CIs")
    conformal_alpha: tuple = setting((0.05, 0.10), "control", alpha_list(),
        "miscoverage levels of the report's conformal prediction sets (table 7), each in (0, 1)")
    explain_samples: int = setting(2, "control", integer(0),
        "Grad-CAM/attention examples per class x correct/wrong among the fixed split's test tuples")
    tensorboard: bool = setting(True, "control", boolean(),
        "write TensorBoard curves of every run under output/tensorboard/<run>/<split>/")
    # compute: how fast, never what a run learns
    device: str = setting("auto", "compute", device_name(),
        "where models run: auto picks CUDA (the torchrun local rank's GPU) when available, else the CPU")
    precision: str = setting("auto", "compute", choice(PRECISIONS),
        "compute dtype: auto is bf16 (or fp16) autocast on a GPU, fp32 on CPU; fp32/bf16/fp16 apply on any device")
    amp: bool = setting(True, "compute", boolean(),
        "mixed precision on the GPU under --precision auto; --no-amp makes auto fp32 everywhere")
    channels_last: str = setting("auto", "compute", choice(SWITCHES),
        "channels_last memory layout of the model in training: auto turns it on for CUDA only")
    fused_adamw: str = setting("auto", "compute", choice(SWITCHES),
        "the fused AdamW kernel: auto turns it on for CUDA only")
    compile: bool = setting(False, "compute", boolean(),
        "torch.compile the training forward pass (slower start, faster epochs on a GPU)")
    compile_backend: str = setting("inductor", "compute", choice(COMPILE_BACKENDS),
        "torch.compile backend: inductor builds kernels, aot_eager and eager only capture graphs (for debugging)")
    jobs: int = setting(0, "compute", integer(0),
        "training runs or tuning trials at once in separate processes (0: as many as free GPU memory holds at the size one run measures, 1 on CPU)")
    lock_stale_s: int = setting(600, "control", integer(10),
        "seconds without a heartbeat after which another process takes over a run's lock")
    checkpoint_every_s: int = setting(300, "compute", integer(0),
        "seconds between a run's resume checkpoints (last.pth, also written at its end): --resume loses at most this much")
    # which stages, folds and runs
    stages: tuple = setting((), "control", stage_list(),
        "stages to run, in pipeline order (empty: analyze to report, or predict alone with --input)")
    folds: tuple = setting((), "control", fold_list(),
        "CV folds the cv, baselines, ablations and tune stages train, e.g. 0,2 (empty: every fold)")
    runs: tuple = setting((), "control", name_list(),
        "only these runs of the training stages, named as under output/runs/, e.g. mmnet,linear_probe (empty: all)")
    resume: bool = setting(False, "control", boolean(),
        "continue interrupted runs from their last checkpoint instead of starting them over")
    force: bool = setting(False, "control", boolean(),
        "retrain runs that already finished (have metrics.json) instead of reading their results back")
    plan: bool = setting(False, "control", boolean(),
        "train nothing: list every unit the command would train, reuse, refuse or skip, its peak disk and its wall time measured on this device")
    # tuning
    tune_scope: str = setting("fixed", "control", choice(TUNE_SCOPES),
        "fixed: one study on the fixed split's train+val patients (honest for the fixed split); per_fold: a study per CV fold on its training patients (nested CV)")
    tune_trials: int = setting(20, "control", integer(1),
        "trials this tune run adds to the Optuna study (shared with earlier runs of the same settings)")
    tune_minutes: float = setting(0.0, "control", number(0),
        "stop starting new tuning trials after this many minutes (0: no time limit)")
    tune_space: str = setting("", "control", path_or_empty(
        "empty (the default search space) or an existing JSON/YAML file", "missing/space.yaml"),
        "JSON/YAML file that changes the tune stage's search space entry by entry (empty: the default space)")
    tuning: str = setting("", "control", path_or_empty(
        "empty or a best_config.json written by the tune stage", "missing/best_config.json"),
        "best_config.json these settings came from (set by --config): its study's patients go into every run's record and the leak guard")
    tuned_folds: str = setting("", "control", path_or_empty(
        "empty or the tuning folder of --stages tune --tune-scope per_fold", "missing/tuning", folder=True),
        "tuning folder of --tune-scope per_fold: CV fold k trains with fold k's tuned settings (empty: none)")
    # prediction, export, distillation
    input: tuple = setting((), "control", path_list(),
        "image files or folders the predict stage scores; giving it alone runs predict")
    checkpoint: str = setting("", "control", path_or_empty(
        "empty (models/best_model.pth under --output-dir) or an existing checkpoint file", "missing/model.pth"),
        "checkpoint predict and export use instead of models/best_model.pth under --output-dir")
    ensemble: bool = setting(False, "control", boolean(),
        "predict and export use the mean of the CV fold models instead of a single checkpoint")
    student_backbone: str = setting("mobilenetv3_small_050", "per_run", backbone_name(),
        "backbone of the distilled student (distill stage): a timm model or hf-hub:ORG/NAME")
    student_image_size: int = setting(160, "per_run", image_side(),
        "side in pixels of the images the distilled student trains on and reads")
    student_embed_dim: int = setting(128, "per_run", integer(8),
        "embedding width of the distilled student (MMNet's own is 256)")
    distill_temperature: float = setting(4.0, "per_run", number(0, low_open=True),
        "temperature softening teacher and student probabilities in the distillation term")
    distill_weight: float = setting(0.7, "per_run", number(0, 1),
        "share of the distillation term in the student's loss; the rest is the usual label loss")


def demo_overrides():
    """CPU-sized settings for the synthetic demo (a small backbone, the ResNet baseline on ResNet-10-T, 64 px, 4 epochs
    of 4 tuples per patient); two runs at once where there are two cores (one torch thread each: 1.5x faster than one
    run on two threads)."""
    return dict(
        synthetic=True, pretrained=False, backbone="mobilenetv3_small_050", resnet_backbone="resnet10t", image_size=64,
        subtype_min_images=50, epochs=4, batch_size=16, tuples_per_patient=4, warmup_epochs=1,
        patience=3, bootstrap=200, lr=1e-3, student_image_size=32, jobs=min(2, os.cpu_count() or 1),
    )


def config_fields():
    return {f.name: f for f in fields(Config)}


def of_kind(*kinds):
    """The names of the fields of these kinds, in field order."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown setting kind(s) {', '.join(sorted(unknown))}; kinds are {', '.join(KINDS)}")
    return tuple(f.name for f in fields(Config) if f.metadata["kind"] in kinds)


def list_kind(name):
    """The element type of a list field, as its flag and a config file read it: from its default's elements."""
    if name == "folds":
        return int
    default = config_fields()[name].default
    return type(default[0]) if default else str

