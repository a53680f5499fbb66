"""Start-up checks of every config field, and resource errors (memory, disk) turned into messages that name a fix."""
import errno
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from config import (COMPILE_BACKENDS, MAGNIFICATIONS, PRECISIONS, SELECTIONS, SWITCHES, THRESHOLD_RULES, TUNE_SCOPES,
                    config_fields)
from utils.helpers import PipelineError

STRIDE = 32  # timm CNN backbones downsample by 32 at their last stage, so sizes that are multiples of 32 always fit
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
HUB_MODEL = re.compile(r"hf[-_]hub:[\w.-]+/[\w.-]+(@[\w./-]+)?")


@dataclass(frozen=True)
class Rule:
    """What one flag accepts: a test, its wording (for messages and --help) and one value it rejects."""
    ok: Callable[[Any], bool]
    allowed: str
    bad: Any
    problem: str = "is not valid"
    choices: tuple = ()
    metavar: str = ""


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo, hi=None):
    if hi is None:
        return Rule(lambda v: is_int(v) and v >= lo, f"an integer >= {lo}", lo - 1, "is out of range")
    return Rule(lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]", lo - 1, "is out of range")


def number(lo, hi=None, low_open=False, high_open=False):
    """A finite number above lo (and below hi); open ends exclude the bound."""
    def ok(v):
        if not is_number(v):
            return False
        above = v > lo if low_open else v >= lo
        below = hi is None or (v < hi if high_open else v <= hi)
        return above and below
    if hi is None:
        return Rule(ok, f"a number {'>' if low_open else '>='} {lo}", lo if low_open else lo - 1, "is out of range")
    ends = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    return Rule(ok, f"a number in {ends}", lo if low_open else lo - 1, "is out of range")


def fraction():
    return number(0, 1, low_open=True, high_open=True)


def image_size():
    return Rule(lambda v: is_int(v) and v >= STRIDE and v % STRIDE == 0,
                f"an integer >= {STRIDE} and a multiple of {STRIDE} (the output stride of timm CNN backbones)",
                STRIDE + STRIDE // 2, "is out of range")


def boolean():
    return Rule(lambda v: isinstance(v, bool), "true or false (--flag / --no-flag)", "yes")


def text(empty=False):
    return Rule(lambda v: isinstance(v, str) and (empty or v.strip() != ""),
                "a text (may be empty)" if empty else "a non-empty text", None if empty else "")


def device():
    return Rule(lambda v: isinstance(v, str) and DEVICE.fullmatch(v) is not None,
                "one of auto, cpu, cuda, cuda:N, mps", "gpu")


def timm_model():
    """A backbone name timm knows (timm.is_model; no weights are loaded)."""
    def ok(v):
        import timm
        return isinstance(v, str) and timm.is_model(v)
    return Rule(ok, "a timm model name, see timm.list_models()", "no_such_backbone", "is unknown")


def backbone_name():
    """A timm model name (timm.is_model) or a timm model on the Hugging Face hub, hf-hub:ORG/NAME[@REVISION]."""
    def ok(v):
        import timm
        return isinstance(v, str) and (timm.is_model(v) or HUB_MODEL.fullmatch(v) is not None)
    return Rule(ok, "a timm model name (see timm.list_models()) or hf-hub:ORG/NAME", "no_such_backbone", "is unknown")


def path_or_empty(allowed, bad, folder=False):
    """Empty or an existing file (a folder with `folder`); `allowed` says what each means."""
    exists, what = (Path.is_dir, "folder") if folder else (Path.is_file, "file")
    return Rule(lambda v: isinstance(v, str) and (v == "" or exists(Path(v))), allowed, bad, f"is not a {what}",
                metavar="PATH")


def alpha_list():
    return Rule(lambda v: distinct(v) and len(v) > 0 and all(is_number(a) and 0 < a < 1 for a in v),
                "levels in (0, 1) without repeats, comma-separated", (1.5,), "is out of range")


def path_list():
    return Rule(lambda v: distinct(v) and all(isinstance(p, str) and p.strip() for p in v),
                "image files or folders, comma-separated (empty: none)", ("",))


def distinct(items):
    return isinstance(items, tuple) and len(set(items)) == len(items)


def magnifications():
    return Rule(lambda v: distinct(v) and len(v) > 0 and all(m in MAGNIFICATIONS for m in v),
                f"a non-empty subset of {','.join(MAGNIFICATIONS)} without repeats", ("40X", "40X"))


def fold_list():
    return Rule(lambda v: distinct(v) and all(is_int(k) and k >= 0 for k in v),
                "fold numbers >= 0 without repeats (empty: all folds)", (-1,))


def stage_list():
    return Rule(lambda v: distinct(v) and all(isinstance(s, str) and s for s in v),
                "stage names without repeats (empty: all stages)", ("cv", "cv"))


def choice(options):
    return Rule(lambda v: v in options, f"one of {', '.join(options)}", "none", choices=tuple(options))


def name_list():
    return Rule(lambda v: distinct(v) and all(isinstance(s, str) and s for s in v),
                "run names without repeats (empty: every run of the stage)", ("a", "a"))


def stage_indices():
    return Rule(lambda v: isinstance(v, tuple) and len(v) > 0 and distinct(v) and all(is_int(k) for k in v),
                "backbone stage indices without repeats, e.g. 2 or 2,-1 (0 = first, -1 = last)", (2, 2))


def three_fractions():
    """Train/val/test shares of the fixed split: three numbers in (0, 1) summing to 1."""
    def ok(v):
        if not isinstance(v, tuple) or len(v) != 3 or not all(fraction().ok(x) for x in v):
            return False
        return math.isclose(sum(v), 1.0, abs_tol=1e-6)
    return Rule(ok, "three fractions in (0, 1) that sum to 1, e.g. 0.7,0.15,0.15", (0.7, 0.2, 0.2))


RULES = dict(
    data_root=text(), output_dir=text(), demo=boolean(), synthetic=boolean(), seed=integer(0, 2**32 - 1),
    device=device(),
    magnifications=magnifications(), image_size=image_size(), cache_dir=text(empty=True),
    subtype_min_images=integer(0),
    n_folds=integer(2), val_fraction=fraction(), fixed_split=three_fractions(), folds=fold_list(),
    backbone=backbone_name(), pretrained=boolean(), shared_backbone=boolean(),
    pretrained_path=path_or_empty("empty (weights from the hub) or an existing weights file", "missing/weights.pth"),
    drop_rate=number(0, 1, high_open=True),
    epochs=integer(1), batch_size=integer(1), accum_steps=integer(1), lr=number(0, low_open=True),
    backbone_lr_scale=number(0, low_open=True), weight_decay=number(0), warmup_epochs=integer(0),
    grad_clip=number(0), patience=integer(1), selection=choice(SELECTIONS), freeze_backbone=boolean(),
    frozen_epochs=integer(0), feature_stage=stage_indices(), runs=name_list(), tuples_per_patient=integer(1), focal_gamma=number(0),
    label_smoothing=number(0, 1, high_open=True), checkpoint_every_s=integer(0), plan=boolean(),
    subtype_loss_weight=number(0), amp=boolean(), precision=choice(PRECISIONS),
    channels_last=choice(SWITCHES), fused_adamw=choice(SWITCHES), compile=boolean(),
    compile_backend=choice(COMPILE_BACKENDS), jobs=integer(0), stain_norm=boolean(), tta=boolean(),
    smote=boolean(), max_bad_steps=integer(1),
    resume=boolean(), force=boolean(), stages=stage_list(),
    bootstrap=integer(0), conformal_alpha=alpha_list(), explain_samples=integer(0), resnet_backbone=timm_model(),
    input=path_list(), ensemble=boolean(), lock_stale_s=integer(10),
    checkpoint=path_or_empty("empty (models/best_model.pth under --output-dir) or an existing checkpoint file",
                             "missing/model.pth"),
    tune_trials=integer(1), tune_minutes=number(0), tune_scope=choice(TUNE_SCOPES),
    tune_space=path_or_empty("empty (the default search space) or an existing JSON/YAML file", "missing/space.yaml"),
    tuned_folds=path_or_empty("empty or the tuning folder of --stages tune --tune-scope per_fold", "missing/tuning",
                              folder=True),
    tuning=path_or_empty("empty or a best_config.json written by the tune stage", "missing/best_config.json"),
    tensorboard=boolean(),
    student_backbone=backbone_name(), student_image_size=image_size(), student_embed_dim=integer(8),
    distill_temperature=number(0, low_open=True), distill_weight=number(0, 1),
    threshold_rule=choice(THRESHOLD_RULES), inner_folds=integer(2),
)


def flag(name):
    return "--" + name.replace("_", "-")


def shown(value):
    """A value as it is typed on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "''" if value == "" else str(value)


def fail(name, value, allowed, problem="is not valid"):
    raise PipelineError(f"{flag(name)} {shown(value)} {problem}: must be {allowed}")


def check_field(name, value):
    rule = RULES.get(name)
    if rule is None:
        raise PipelineError(f"config field '{name}' has no rule in utils/checks.py RULES; add one")
    if not rule.ok(value):
        fail(name, value, rule.allowed, rule.problem)


def check_config(cfg, stage_names=None):
    """Every field against its rule, then the rules that tie fields together; the first problem is raised."""
    for name in config_fields():
        check_field(name, getattr(cfg, name))
    bad_folds = [k for k in cfg.folds if k >= cfg.n_folds]
    if bad_folds:
        fail("folds", cfg.folds, f"fold numbers in 0..{cfg.n_folds - 1} (--n-folds {cfg.n_folds})", "is out of range")
    unknown = [s for s in cfg.stages if stage_names is not None and s not in stage_names]
    if unknown:
        fail("stages", cfg.stages, f"stage names among {','.join(stage_names)}")
    check_modes(cfg)
    return cfg


def check_modes(cfg):
    """Frozen backbone, probe-then-fine-tune and the selection rule must agree with each other."""
    if cfg.freeze_backbone and cfg.frozen_epochs:
        raise PipelineError("--freeze-backbone trains on frozen features throughout; --frozen-epochs N freezes only "
                            "the first N epochs. Pass one of them.")
    if cfg.frozen_epochs >= cfg.epochs:
        fail("frozen_epochs", cfg.frozen_epochs, f"below --epochs {cfg.epochs} (use --freeze-backbone to never "
             f"unfreeze)", "is out of range")
    if cfg.tta and cfg.freeze_backbone:
        raise PipelineError("--tta turns images; cached backbone features cannot be turned. Drop --tta or "
                            "--freeze-backbone.")


def is_disk_full(e):
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def resource_errors(what, batch_flag="--batch-size", folder=None):
    """Out of memory -> PipelineError naming the flags to lower; disk full -> one naming the folder to free."""
    import torch
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        kind = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU"
        raise PipelineError(f"{what} ran out of {kind} memory. Lower {batch_flag} (keep the effective batch with "
                            f"--accum-steps) or --image-size, then continue with --resume.") from None
    except OSError as e:
        if not is_disk_full(e):
            raise
        where = folder or (Path(e.filename).parent if e.filename else "the output and cache folders")
        raise PipelineError(f"{what}: no space left on the disk holding {where}. Free space there (old runs under "
                            f"--output-dir, stale images_*.npy under --cache-dir) or point --output-dir / "
                            f"--cache-dir at a bigger disk, then continue with --resume.") from None
