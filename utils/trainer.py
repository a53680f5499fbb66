"""Training loop: AdamW, warmup + cosine, AMP, accumulation, clipping, early stopping on validation patient AUC."""
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from preprocess.transforms import MEAN, STD, prepare, tta_views
from utils.env import amp_dtype
from utils.helpers import PipelineError, log, warn
from utils.metrics import binary_metrics, patient_level, safe_auc, youden_threshold

CHECKED_KWARGS = ("backbone", "magnifications", "num_subtypes", "shared_backbone", "use_spatial", "use_channel",
                  "use_hma", "use_cmf", "use_mags", "mag")


def seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, sampler, cfg, device, seed=0):
    """Loader over pre-batched samplers; at most one worker per CPU; pinned, persistent workers on CUDA."""
    cuda = device.type == "cuda"
    workers = max(0, min(int(cfg.workers), os.cpu_count() or 1))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=cuda,
                      persistent_workers=cuda and workers > 0, worker_init_fn=seed_worker, generator=generator,
                      prefetch_factor=4 if workers else None)


def precision(cfg, device):
    """(autocast dtype or None, GradScaler or None): bf16 or fp16 AMP on CUDA, fp32 on CPU."""
    dtype = amp_dtype(device) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return dtype, scaler


def autocast(device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def build_optimizer(model, cfg):
    """AdamW; a pretrained backbone at lr * backbone_lr_scale (random init at lr); no decay on biases and norms."""
    if hasattr(model, "param_groups"):
        backbone, head = model.param_groups()
    else:
        backbone, head = [], list(model.parameters())
    scale = cfg.backbone_lr_scale if cfg.pretrained or cfg.pretrained_path else 1.0
    groups = []
    for params, lr in ((backbone, cfg.lr * scale), (head, cfg.lr)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        plain = [p for p in params if p.dim() < 2]
        groups += [dict(params=decay, lr=lr, weight_decay=cfg.weight_decay), dict(params=plain, lr=lr, weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999))


def lr_factor(step, warmup, total, floor=0.01):
    """Linear warmup to 1, then cosine down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg, batches_per_epoch):
    steps = math.ceil(batches_per_epoch / max(1, cfg.accum_steps))
    total, warmup = steps * cfg.epochs, steps * cfg.warmup_epochs
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))


def rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_optimizer(model, optimizer, scheduler, scaler, cfg):
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def compute_loss(criterion, out, labels, subtypes):
    return criterion(out, labels, subtypes)


def bad_step(state, cfg, epoch, step):
    state["bad_steps"] += 1
    warn(f"non-finite loss at epoch {epoch}, step {step}: step skipped ({state['bad_steps']}/{cfg.max_bad_steps})")
    if state["bad_steps"] >= cfg.max_bad_steps:
        raise PipelineError(
            f"training diverged: {state['bad_steps']} steps had a non-finite loss (limit --max-bad-steps "
            f"{cfg.max_bad_steps}). Lower --lr, keep --grad-clip on, or try --no-amp.")


def train_epoch(model, loader, optimizer, scheduler, scaler, criterion, cfg, device, dtype, state, epoch):
    """One pass over fresh training tuples; returns (mean loss, accuracy at 0.5)."""
    model.train()
    total, correct, seen, accum = 0.0, 0, 0, max(1, cfg.accum_steps)
    bar = tqdm(loader, total=len(loader.sampler), desc=f"epoch {epoch}", leave=False, disable=None, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    pending = 0
    for step, (images, mask, labels, subtypes) in enumerate(bar, 1):
        x, mask = prepare(images, mask, device, train=True)
        labels, subtypes = labels.to(device, non_blocking=True), subtypes.to(device, non_blocking=True)
        with autocast(device, dtype):
            out = model(x, mask)
            loss = compute_loss(criterion, out, labels, subtypes)
        if not torch.isfinite(loss):
            bad_step(state, cfg, epoch, step)
            continue
        (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        pending += 1
        if pending == accum:
            step_optimizer(model, optimizer, scheduler, scaler, cfg)
            pending = 0
        n = len(labels)
        total += loss.item() * n
        correct += int(((out["binary_logits"].detach() > 0).float() == labels).sum())
        seen += n
        bar.set_postfix(loss=f"{total / seen:.4f}")
    if pending:
        step_optimizer(model, optimizer, scheduler, scaler, cfg)
    return (total / seen if seen else float("nan")), (correct / seen if seen else float("nan"))


def as_numpy(value, n, width):
    if value is None:
        return np.full((n, width), np.nan, dtype=np.float32)
    return value.detach().float().cpu().numpy()


@torch.no_grad()
def predict(model, loader, device, dtype=None, criterion=None, tta=False):
    """Eval-mode outputs over a loader: prob, subtype_prob, embedding, mag_weights, hma_weights, loss, prob_tta."""
    model.eval()
    keys = ["prob", "subtype_prob", "embedding", "mag_weights", "hma_weights", "prob_tta"]
    parts = {k: [] for k in keys}
    total, seen = 0.0, 0
    for images, mask, labels, subtypes in loader:
        x, mask = prepare(images, mask, device)
        n, m = mask.shape
        with autocast(device, dtype):
            out = model(x, mask)
            if criterion is not None:
                total += float(compute_loss(criterion, out, labels.to(device), subtypes.to(device))) * n
        seen += n
        parts["prob"].append(torch.sigmoid(out["binary_logits"].float()).cpu().numpy())
        sub = out.get("subtype_logits")
        parts["subtype_prob"].append(torch.softmax(sub.float(), 1).cpu().numpy() if sub is not None else np.zeros((n, 0)))
        parts["embedding"].append(as_numpy(out.get("embedding"), n, 0))
        parts["mag_weights"].append(as_numpy(out.get("mag_weights"), n, m))
        parts["hma_weights"].append(as_numpy(out.get("hma_weights"), n, m))
        if tta:
            parts["prob_tta"].append(tta_prob(model, x, mask, device, dtype))
    res = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    res["loss"] = total / seen if seen and criterion is not None else float("nan")
    return res


def tta_prob(model, x, mask, device, dtype):
    """Malignant probability averaged over flips and a 90-degree turn."""
    probs = []
    for view in tta_views(x):
        with autocast(device, dtype):
            probs.append(torch.sigmoid(model(view, mask)["binary_logits"].float()))
    return torch.stack(probs).mean(0).cpu().numpy()


def validation_row(tuples, res):
    """History fields from validation tuples: tuple-level metrics at 0.5, patient-level AUC, Youden threshold."""
    y = tuples["label"].to_numpy()
    m = binary_metrics(y, res["prob"], 0.5)
    patients = patient_level(tuples.assign(prob_malignant=res["prob"]))
    return dict(val_loss=res["loss"], val_acc=m["accuracy"], val_bal_acc=m["balanced_accuracy"], val_f1=m["f1"],
                val_auc=safe_auc(patients["label"], patients["prob_malignant"]), val_auc_tuple=m["auc"],
                threshold=youden_threshold(y, res["prob"]))


def score_of(row):
    """Early-stopping score: patient AUC, ties broken by tuple AUC, then lower loss."""
    def finite(v, default=-1.0):
        return float(v) if v is not None and np.isfinite(v) else default
    return (finite(row["val_auc"]), finite(row["val_auc_tuple"]), -finite(row["val_loss"], 1e9))


def checkpoint(model, meta, cfg, epoch, best_auc):
    """What inference needs: weights, how to rebuild the model, classes, magnifications, size, normalisation."""
    from config import to_dict
    return dict(
        model=model.state_dict(), model_name=meta["model_name"], model_kwargs=dict(meta["model_kwargs"]),
        config=to_dict(cfg), classes={"binary": ["benign", "malignant"], "subtype": list(meta["classes"])},
        magnifications=list(cfg.magnifications), image_size=cfg.image_size,
        normalization={"mean": list(MEAN), "std": list(STD)}, epoch=epoch, best_auc=best_auc,
    )


def describe(ckpt):
    kwargs = ckpt.get("model_kwargs", {})
    info = {k: kwargs.get(k) for k in CHECKED_KWARGS if k in kwargs}
    info.update(model_name=ckpt.get("model_name"), image_size=ckpt.get("image_size"),
                subtype_classes=list(ckpt.get("classes", {}).get("subtype", [])))
    for key in ("magnifications", "use_mags"):
        if info.get(key) is not None:
            info[key] = list(info[key])
    return info


def check_checkpoint(ckpt, expected, path=""):
    """Raise a PipelineError naming every field where checkpoint and current configuration differ."""
    have, want = describe(ckpt), describe(expected)
    diffs = [f"{k}: {have.get(k)!r} in the checkpoint vs {want.get(k)!r} now"
             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if not diffs:
        return
    raise PipelineError(f"checkpoint {path} does not match the current configuration ({'; '.join(diffs)}). "
                        f"Use the settings it was trained with, or retrain with --force.")


def load_state(model, ckpt, path=""):
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise PipelineError(f"checkpoint {path} does not fit model '{ckpt.get('model_name')}' as configured now "
                            f"(state_dict mismatch: {first[:300]}).") from None


def read_checkpoint(path, device="cpu"):
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"checkpoint {path} not found. Train it first (stages cv / fixed / baselines / ablations).")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise PipelineError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). Retrain with --force.") from None


def load_model(path, device="cpu", expect=None):
    """(model in eval mode, checkpoint dict) rebuilt through backbones.build_model; `expect` checks the settings."""
    from backbones import build_model
    ckpt = read_checkpoint(path, device)
    if expect is not None:
        check_checkpoint(ckpt, expect, path)
    kwargs = dict(ckpt["model_kwargs"], pretrained=False)
    if "pretrained_path" in kwargs:
        kwargs["pretrained_path"] = ""
    model = build_model(ckpt["model_name"], **kwargs)
    load_state(model, ckpt, path)
    return model.to(device).eval(), ckpt


def save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def slim_last(folder):
    """A finished run's last.pth drops the optimiser state (only --resume needs it), or links best.pth if equal."""
    ckpt_dir = Path(folder) / "checkpoints"
    last, best = ckpt_dir / "last.pth", ckpt_dir / "best.pth"
    if not last.exists():
        return
    ckpt = read_checkpoint(last)
    if best.exists() and ckpt.get("state", {}).get("best_epoch") == ckpt["epoch"] and link(best, last):
        return
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        ckpt.pop(key, None)
    save(ckpt, last)


def link(source, target):
    """Replace target by a hard link to source; False where the file system has no hard links."""
    tmp = target.with_suffix(".link")
    try:
        os.link(source, tmp)
    except OSError:
        return False
    tmp.replace(target)
    return True


def fresh_state():
    return dict(epoch=0, history=[], best_score=None, best_epoch=0, best_auc=float("nan"), bad_epochs=0,
                bad_steps=0, stopped=False, seconds=0.0)


def resume(folder, model, optimizer, scheduler, scaler, meta, cfg):
    """Training state from checkpoints/last.pth when --resume and it exists, else a fresh state."""
    path = Path(folder) / "checkpoints" / "last.pth"
    if not cfg.resume or not path.exists():
        return fresh_state()
    ckpt = read_checkpoint(path)
    check_checkpoint(ckpt, checkpoint(model, meta, cfg, 0, 0), path)
    if "optimizer" not in ckpt:
        log(f"{path} belongs to a finished run; training it again from scratch")
        return fresh_state()
    load_state(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    log(f"Resuming from {path} after epoch {ckpt['state']['epoch']}")
    return ckpt["state"]


def epoch_line(tag, epoch, cfg, row, best):
    return (f"[{tag}] epoch {epoch:>2}/{cfg.epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} bal {row['val_bal_acc']:.3f} "
            f"F1 {row['val_f1']:.3f} AUC {row['val_auc']:.3f} (tuple {row['val_auc_tuple']:.3f}) | "
            f"t {row['threshold']:.2f} | lr {row['lr']:.2e} | {row['seconds']:.1f}s{' *' if best else ''}")


def fit(cfg, model, run, device, callback=None):
    """Train with early stopping; writes history.csv, checkpoints/best.pth and last.pth; returns the final state."""
    folder = Path(run["folder"])
    ckpt_dir = folder / "checkpoints"
    model.to(device)
    dtype, scaler = precision(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(run["train_sampler"]))
    state = resume(folder, model, optimizer, scheduler, scaler, run, cfg)
    train_loader = make_loader(run["dataset"], run["train_sampler"], cfg, device, cfg.seed)
    val_loader = make_loader(run["dataset"], run["batches"]["val"], cfg, device, cfg.seed)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["stopped"]:
            break
        start = time.time()
        run["train_sampler"].set_epoch(epoch)
        loss, acc = train_epoch(model, train_loader, optimizer, scheduler, scaler, run["criterion"], cfg, device,
                                dtype, state, epoch)
        row = dict(epoch=epoch, train_loss=loss, train_acc=acc)
        row.update(validation_row(run["tuples"]["val"], predict(model, val_loader, device, dtype, run["criterion"])))
        row.update(lr=optimizer.param_groups[-1]["lr"], seconds=time.time() - start)
        improved = state["best_score"] is None or score_of(row) > tuple(state["best_score"])
        if improved:
            state.update(best_score=list(score_of(row)), best_epoch=epoch, best_auc=row["val_auc"], bad_epochs=0)
            save(checkpoint(model, run, cfg, epoch, row["val_auc"]), ckpt_dir / "best.pth")
        else:
            state["bad_epochs"] += 1
        state["history"].append(row)
        state.update(epoch=epoch, seconds=state["seconds"] + row["seconds"], stopped=state["bad_epochs"] >= cfg.patience)
        log(epoch_line(run["tag"], epoch, cfg, row, improved))
        pd.DataFrame(state["history"]).to_csv(folder / "history.csv", index=False)
        last = checkpoint(model, run, cfg, epoch, state["best_auc"])
        last.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler else None, rng=rng_state(), state=state)
        save(last, ckpt_dir / "last.pth")
        if state["stopped"]:
            log(f"[{run['tag']}] early stop: validation AUC not better for {cfg.patience} epochs "
                f"(best epoch {state['best_epoch']})")
        if callback is not None:
            callback(epoch, state)
    best = ckpt_dir / "best.pth"
    if best.exists():
        load_state(model, read_checkpoint(best, device), best)
    return state
