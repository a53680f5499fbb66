"""Device, seeds and the environment facts written next to every run."""
import os
import platform
import random

import numpy as np
import torch


def resolve_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def amp_dtype(device):
    """bf16 where the GPU supports it, else fp16; None on CPU (fp32)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def environment():
    import timm
    device = resolve_device()
    info = dict(
        python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
        numpy=np.__version__, platform=platform.platform(), device=str(device),
        cpu_threads=torch.get_num_threads(), cuda=torch.version.cuda, gpu=None, gpu_memory_gb=None,
    )
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return info
