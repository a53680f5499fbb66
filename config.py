"""Every setting of the pipeline in one dataclass: its default and what it does; each field is a main.py flag."""
import os
from dataclasses import dataclass, field, fields

MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
SELECTIONS = ("auc", "smooth", "loss", "ema", "swa")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SWITCHES = ("auto", "on", "off")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
THRESHOLD_RULES = ("fixed_0.5", "val_youden", "oof_youden")
TUNE_SCOPES = ("fixed", "per_fold")


def setting(default, help):
    """A Config field with its --help line (the allowed values come from utils/checks.py, the default from here)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data and output
    data_root: str = setting("data", "where BreakHis is: any folder holding histology_slides/breast, or a flat folder of BreakHis-named images")
    output_dir: str = setting("output", "folder every stage reads from and writes to: index, splits, runs, models, tables, plots, report.html")
    demo: bool = setting(False, "CPU-sized settings on a generated BreakHis tree under data/synthetic; every output marked synthetic")
    synthetic: bool = setting(False, "mark every output as coming from generated images (console banner, config.json, report and paper tables)")
    seed: int = setting(42, "seed of the patient splits, tuple draws, weight initialisation, subtype head, tuning sampler and bootstrap")
    magnifications: tuple = setting(MAGNIFICATIONS, "magnifications a tuple holds and the models read; also the single-magnification baselines and ablations run")
    image_size: int = setting(224, "short side in pixels every field is resized to, keeping its aspect ratio (700x460 -> 341x224); training crops are this square")
    stain_norm: bool = setting(False, "Macenko stain normalisation of every image as it is decoded; the checkpoint carries it to predict")
    cache_dir: str = setting("", "folder for the decoded-image and frozen-feature caches (empty: cache/ under --output-dir); safe to delete")
    subtype_min_images: int = setting(500, "subtypes with fewer images than this are merged into Other for the subtype head")
    # splits
    n_folds: int = setting(5, "number of patient-wise cross-validation folds; also the number of table 2's ensemble members")
    val_fraction: float = setting(0.15, "share of each CV fold's non-test patients (per class) held out as its validation patients")
    fixed_split: tuple = setting((0.70, 0.15, 0.15), "train,val,test shares of patients in the fixed split (stratified by class)")
    inner_folds: int = setting(5, "inner grouped folds over a run's train+val patients: the models behind oof_youden, and the probe's C")
    # model
    backbone: str = setting("mobilenetv4_conv_small", "image backbone of MMNet and the baselines: a timm model (CNN or ViT) or hf-hub:ORG/NAME")
    pretrained: bool = setting(True, "start the backbones from pretrained (ImageNet or hub) weights; --no-pretrained trains from random init")
    pretrained_path: str = setting("", "local weights file for --backbone, loaded instead of downloading (empty: weights from the hub)")
    feature_stage: tuple = setting((-1,), "backbone stage(s) the models read, e.g. 2 or 2,-1 (-1: last); blocks past the deepest one are dropped")
    freeze_backbone: bool = setting(False, "keep the backbone frozen throughout: models train on cached backbone features, only their own modules learn")
    frozen_epochs: int = setting(0, "train on frozen-backbone features for the first N epochs, then fine-tune the whole model (LP-FT; 0: off)")
    shared_backbone: bool = setting(True, "MMNet shares one backbone across magnifications; --no-shared-backbone gives each its own")
    drop_rate: float = setting(0.3, "dropout probability before the classification heads (and in the baselines' embedding MLP)")
    resnet_backbone: str = setting("resnet50", "timm ResNet of the ImageNet-transfer baseline (resnet50_transfer), on the first magnification")
    # training
    epochs: int = setting(30, "training epochs per run (the most, when the selection rule stops early)")
    batch_size: int = setting(32, "tuples per batch in training, evaluation and prediction")
    lr: float = setting(3e-4, "peak AdamW learning rate (warmup, then cosine decay); a pretrained backbone gets it x --backbone-lr-scale")
    backbone_lr_scale: float = setting(1.0, "factor on --lr for a pretrained backbone's parameters (random init trains the backbone at --lr)")
    warmup_epochs: int = setting(2, "epochs of linear learning-rate warmup before the cosine decay")
    weight_decay: float = setting(0.05, "AdamW weight decay on weight matrices and kernels (biases and norm layers get none)")
    grad_clip: float = setting(1.0, "maximum gradient norm per optimiser step (0: no clipping)")
    accum_steps: int = setting(1, "batches whose gradients are summed per optimiser step (effective batch = batch size x this)")
    tuples_per_patient: int = setting(32, "random training tuples (one image per magnification) drawn per patient each epoch")
    focal_gamma: float = setting(0.0, "focusing exponent of the class-weighted benign/malignant focal loss (0: weighted cross-entropy)")
    label_smoothing: float = setting(0.1, "benign/malignant targets pulled towards 1/2 by this much (patient labels on every field are noisy)")
    subtype_loss_weight: float = setting(0.5, "weight of the subtype cross-entropy added to the benign/malignant loss (0: no subtype loss)")
    selection: str = setting("swa", "which weights a run keeps: swa averages the second half's epochs, auc/smooth/loss/ema pick by validation")
    patience: int = setting(8, "epochs without a better validation score before a run stops early (not under --selection swa)")
    max_bad_steps: int = setting(10, "steps with a non-finite loss a run may skip before it stops as diverged")
    # evaluation
    threshold_rule: str = setting("fixed_0.5", "decision threshold that leads the tables and decides in predict: 0.5, Youden on validation or on inner out-of-fold predictions, per level")
    tta: bool = setting(False, "evaluate on the mean over four views (flips, a quarter turn): thresholds, tables and predict all use it")
    smote: bool = setting(True, "refit the subtype head on SMOTE-balanced training embeddings and report it beside the plain head")
    bootstrap: int = setting(1000, "patient resamples behind the report's 95% confidence intervals and paired AUC-difference CIs")
    conformal_alpha: tuple = setting((0.05, 0.10), "miscoverage levels of the report's conformal prediction sets (table 7), each in (0, 1)")
    explain_samples: int = setting(2, "Grad-CAM/attention examples per class x correct/wrong among the fixed split's test tuples")
    tensorboard: bool = setting(True, "write TensorBoard curves of every run under output/tensorboard/<run>/<split>/")
    # compute: how fast, never what a run learns
    device: str = setting("auto", "where models run: auto picks CUDA (the torchrun local rank's GPU) when available, else the CPU")
    precision: str = setting("auto", "compute dtype: auto is bf16 (or fp16) autocast on a GPU, fp32 on CPU; fp32/bf16/fp16 apply on any device")
    amp: bool = setting(True, "mixed precision on the GPU under --precision auto; --no-amp makes auto fp32 everywhere")
    channels_last: str = setting("auto", "channels_last memory layout of the model in training: auto turns it on for CUDA only")
    fused_adamw: str = setting("auto", "the fused AdamW kernel: auto turns it on for CUDA only")
    compile: bool = setting(False, "torch.compile the training forward pass (slower start, faster epochs on a GPU)")
    compile_backend: str = setting("inductor", "torch.compile backend: inductor builds kernels, aot_eager and eager only capture graphs (for debugging)")
    jobs: int = setting(0, "training runs or tuning trials at once in separate processes (0: as many as free GPU memory holds at the size one run measures, 1 on CPU)")
    lock_stale_s: int = setting(600, "seconds without a heartbeat after which another process takes over a run's lock")
    checkpoint_every_s: int = setting(300, "seconds between a run's resume checkpoints (last.pth, also written at its end): --resume loses at most this much")
    # which stages, folds and runs
    stages: tuple = setting((), "stages to run, in pipeline order (empty: analyze to report, or predict alone with --input)")
    folds: tuple = setting((), "CV folds the cv, baselines, ablations and tune stages train, e.g. 0,2 (empty: every fold)")
    runs: tuple = setting((), "only these runs of the training stages, named as under output/runs/, e.g. mmnet,linear_probe (empty: all)")
    resume: bool = setting(False, "continue interrupted runs from their last checkpoint instead of starting them over")
    force: bool = setting(False, "retrain runs that already finished (have metrics.json) instead of reading their results back")
    plan: bool = setting(False, "train nothing: list every unit the command would train, reuse, refuse or skip, its peak disk and its wall time measured on this device")
    # tuning
    tune_scope: str = setting("fixed", "fixed: one study on the fixed split's train+val patients (honest for the fixed split); per_fold: a study per CV fold on its training patients (nested CV)")
    tune_trials: int = setting(20, "trials this tune run adds to the Optuna study (shared with earlier runs of the same settings)")
    tune_minutes: float = setting(0.0, "stop starting new tuning trials after this many minutes (0: no time limit)")
    tune_space: str = setting("", "JSON/YAML file that changes the tune stage's search space entry by entry (empty: the default space)")
    tuning: str = setting("", "best_config.json these settings came from (set by --config): its study's patients go into every run's record and the leak guard")
    tuned_folds: str = setting("", "tuning folder of --tune-scope per_fold: CV fold k trains with fold k's tuned settings (empty: none)")
    # prediction, export, distillation
    input: tuple = setting((), "image files or folders the predict stage scores; giving it alone runs predict")
    checkpoint: str = setting("", "checkpoint predict and export use instead of models/best_model.pth under --output-dir")
    ensemble: bool = setting(False, "predict and export use the mean of the CV fold models instead of a single checkpoint")
    student_backbone: str = setting("mobilenetv3_small_050", "backbone of the distilled student (distill stage): a timm model or hf-hub:ORG/NAME")
    student_image_size: int = setting(160, "side in pixels of the images the distilled student trains on and reads")
    student_embed_dim: int = setting(128, "embedding width of the distilled student (MMNet's own is 256)")
    distill_temperature: float = setting(4.0, "temperature softening teacher and student probabilities in the distillation term")
    distill_weight: float = setting(0.7, "share of the distillation term in the student's loss; the rest is the usual label loss")


def demo_overrides():
    """CPU-sized settings for the synthetic demo; two runs at once where there are two cores (one torch thread each:
    1.5x faster than one run on two threads)."""
    return dict(
        synthetic=True, pretrained=False, backbone="mobilenetv3_small_050", image_size=64,
        subtype_min_images=50, epochs=4, batch_size=16, tuples_per_patient=8, warmup_epochs=1,
        patience=3, bootstrap=200, lr=1e-3, student_image_size=32, jobs=min(2, os.cpu_count() or 1),
    )


def config_fields():
    return {f.name: f for f in fields(Config)}


def list_kind(name):
    """The element type of a list field, as its flag and a config file read it: from its default's elements."""
    if name == "folds":
        return int
    default = config_fields()[name].default
    return type(default[0]) if default else str

