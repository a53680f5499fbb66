"""Start-up checks of every config field against the rule config.py gives it (rules.py), and resource errors
(memory, disk) turned into messages that name a fix (for a full disk: the folder, its free space, what the work
needs)."""
import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from config import config_fields
from utils.helpers import PipelineError, size_text

RULES = {name: f.metadata["rule"] for name, f in config_fields().items()}


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
    rule = RULES[name]
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


def free_bytes(folder):
    """Free bytes on the disk holding `folder` (or its nearest existing parent); None where that cannot be read."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def space(folder, needs_bytes):
    """' (12.0 MB free now; it needs about 1.3 GB there in all)', with the parts that are known."""
    parts, free = [], free_bytes(folder) if folder else None
    if free is not None:
        parts.append(f"{size_text(free)} free now")
    if needs_bytes:
        parts.append(f"it needs about {size_text(needs_bytes)} there in all")
    return f" ({'; '.join(parts)})" if parts else ""


def full_disk_error(what, where, needs_bytes=None):
    return PipelineError(f"{what}: no space left on the disk holding {where or 'the output and cache folders'}"
                         f"{space(where, needs_bytes)}. Free space there (old runs under --output-dir, stale "
                         f"images_*.npy under --cache-dir) or point --output-dir / --cache-dir at a bigger disk, then "
                         f"continue with --resume.")


def need_space(what, folder, needs_bytes):
    """Stop before a memory-mapped file is written that the disk cannot hold (a full disk under a memory map kills
    the process instead of raising)."""
    free = free_bytes(folder)
    if free is not None and free < needs_bytes:
        raise full_disk_error(what, folder, needs_bytes)


@contextmanager
def resource_errors(what, batch_flag="--batch-size", folder=None, needs_bytes=None):
    """Out of memory -> PipelineError naming the flags to lower; disk full -> one naming the folder to free, its free
    space and, given `needs_bytes`, about how much the work needs there."""
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
        where = folder or (Path(e.filename).parent if e.filename else None)
        raise full_disk_error(what, where, needs_bytes) from None
