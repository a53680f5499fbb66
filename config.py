"""Every default of the pipeline in one dataclass; main.py flags override fields."""
import os
from dataclasses import dataclass, asdict, fields

MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
SELECTIONS = ("auc", "smooth", "loss", "ema", "swa")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SWITCHES = ("auto", "on", "off")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
THRESHOLD_RULES = ("val_youden", "fixed_0.5", "oof_youden")


@dataclass
class Config:
    data_root: str = "data"
    output_dir: str = "output"
    demo: bool = False
    synthetic: bool = False
    seed: int = 42
    device: str = "auto"

    magnifications: tuple = MAGNIFICATIONS
    image_size: int = 224
    cache_dir: str = ""
    subtype_min_images: int = 500

    n_folds: int = 5
    val_fraction: float = 0.15
    fixed_split: tuple = (0.70, 0.15, 0.15)
    folds: tuple = ()
    runs: tuple = ()

    backbone: str = "mobilenetv4_conv_small"
    pretrained: bool = True
    pretrained_path: str = ""
    shared_backbone: bool = True
    drop_rate: float = 0.3
    freeze_backbone: bool = False
    frozen_epochs: int = 0
    feature_stage: tuple = (-1,)

    epochs: int = 30
    batch_size: int = 32
    accum_steps: int = 1
    lr: float = 3e-4
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    grad_clip: float = 1.0
    patience: int = 8
    selection: str = "swa"
    tuples_per_patient: int = 32
    focal_gamma: float = 2.0
    subtype_loss_weight: float = 0.5
    amp: bool = True
    precision: str = "auto"
    channels_last: str = "auto"
    fused_adamw: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    jobs: int = 0
    stain_norm: bool = False
    tta: bool = False
    smote: bool = True
    max_bad_steps: int = 10

    resume: bool = False
    force: bool = False
    stages: tuple = ()

    bootstrap: int = 1000
    explain_samples: int = 2
    resnet_backbone: str = "resnet50"

    input: tuple = ()
    checkpoint: str = ""
    ensemble: bool = False

    # locks
    lock_stale_s: int = 600
    # tuning
    tune_trials: int = 20
    tune_minutes: float = 0.0
    tune_space: str = ""
    # report
    tensorboard: bool = True
    # export, distillation and serving
    student_backbone: str = "mobilenetv3_small_050"
    student_image_size: int = 160
    student_embed_dim: int = 128
    distill_temperature: float = 4.0
    distill_weight: float = 0.7
    # choices from all the training patients
    threshold_rule: str = "fixed_0.5"
    inner_folds: int = 5


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


def to_dict(cfg):
    return asdict(cfg)
