"""The one prediction path: eval-mode model outputs over batches of cache rows (training, evaluation, explain)."""
import numpy as np
import torch

from preprocess.transforms import tta_views
from utils.env import precision_dtype


def amp_settings(cfg, device):
    """(autocast dtype or None, GradScaler or None): --precision (auto: bf16 or fp16 AMP on CUDA, fp32 on CPU); fp16
    trains with a loss scaler on any device."""
    dtype = precision_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return dtype, scaler



def autocast(device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def as_numpy(value, n, width):
    if value is None:
        return np.full((n, width), np.nan, dtype=np.float32)
    return value.detach().float().cpu().numpy()


@torch.no_grad()
def predict(model, bank, batches, device, dtype=None, criterion=None, tta=False):
    """Outputs over batches of (cache rows, labels, subtypes): prob (with `tta`, the mean over four views),
    subtype_prob, embedding, mag_weights, hma_weights, loss."""
    model.eval()
    keys = ["prob", "subtype_prob", "embedding", "mag_weights", "hma_weights"]
    parts = {k: [] for k in keys}
    total, seen = 0.0, 0
    for rows, labels, subtypes in batches:
        x, mask = bank.batch(rows, device, False, model.normalization)
        n, m = mask.shape
        with autocast(device, dtype):
            out = model(x, mask)
            if criterion is not None:
                total += float(criterion(out, targets(labels, device), targets(subtypes, device, torch.long))) * n
        seen += n
        prob = tta_prob(model, x, mask, device, dtype) if tta else torch.sigmoid(out["binary_logits"].float()).cpu()
        parts["prob"].append(np.asarray(prob))
        sub = out.get("subtype_logits")
        parts["subtype_prob"].append(torch.softmax(sub.float(), 1).cpu().numpy() if sub is not None else np.zeros((n, 0)))
        parts["embedding"].append(as_numpy(out.get("embedding"), n, 0))
        parts["mag_weights"].append(as_numpy(out.get("mag_weights"), n, m))
        parts["hma_weights"].append(as_numpy(out.get("hma_weights"), n, m))
    res = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    res["loss"] = total / seen if seen and criterion is not None else float("nan")
    return res


def targets(values, device, dtype=torch.float32):
    return torch.tensor(np.asarray(values), dtype=dtype).to(device, non_blocking=True)



def tta_prob(model, x, mask, device, dtype):
    """Malignant probability averaged over flips and a 90-degree turn."""
    probs = []
    for view in tta_views(x):
        with autocast(device, dtype):
            probs.append(torch.sigmoid(model(view, mask)["binary_logits"].float()))
    return torch.stack(probs).mean(0).cpu().numpy()
