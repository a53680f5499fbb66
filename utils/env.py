"""Device, precision, seeds and the environment facts written next to every run."""
import hashlib
import os
import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from packaging.version import InvalidVersion, Version


def resolve_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(device):
    """bf16 where the GPU supports it, else fp16; None on CPU (fp32)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_dtype(cfg, device):
    """The autocast dtype, None for fp32: --precision when set (any device), else AMP on CUDA with --amp."""
    if cfg.precision != "auto":
        return DTYPES[cfg.precision]
    return amp_dtype(device) if cfg.amp else None


def switch(value, device):
    """An auto/on/off setting: auto means on for CUDA, off elsewhere."""
    return device.type == "cuda" if value == "auto" else value == "on"


def fits_on_gpu(nbytes, device, share=0.5):
    """Whether `nbytes` fit in `share` of the device's free memory (never on a CPU)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < share * free


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def pinned(path):
    """{package: version} of the `name==version` lines of a requirements file."""
    if not path.exists():
        return {}
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==", 1) for line in lines if "==" in line)


def same_version(a, b):
    try:
        return Version(a) == Version(b)
    except (InvalidVersion, TypeError):
        return a == b


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def packages(root=ROOT):
    """Installed versions of the direct dependencies, the lock's hash and where they differ from the lock."""
    lock = root / "requirements.lock"
    direct = {name: installed(name) for name in pinned(root / "requirements.txt")}
    locked = {k.lower(): v for k, v in pinned(lock).items()}
    differ = {k: f"{v} (lock {locked.get(k.lower())})" for k, v in direct.items()
              if locked and v is not None and not same_version(v.split("+")[0], locked.get(k.lower()))}
    digest = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None
    return dict(packages=direct, lock_sha256=digest, differs_from_lock=differ)


def environment():
    import timm
    device = resolve_device()
    info = dict(
        python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
        numpy=np.__version__, platform=platform.platform(), device=str(device),
        cpu_threads=torch.get_num_threads(), cuda=torch.version.cuda, gpu=None, gpu_memory_gb=None, **packages(),
    )
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return info


def commit():
    """The code's git commit (and whether the tree had changes), or '' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
