"""Training one run: AdamW, warmup + cosine, AMP, accumulation, clipping, early stopping and weight selection on the
validation patients, frozen-backbone epochs on cached features; one host sync per step, validation only where the
selection rule or the curves need it, the resume checkpoint every --checkpoint-every-s seconds."""
import math
import time

import numpy as np
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from tqdm import tqdm

from stages.training.checkpoint import (check_checkpoint, checkpoint, load_state, read_checkpoint, rng_state, save,
                                      set_rng_state)
from stages.training.features import install_backbone
from stages.training.live import Curves
from stages.training.forward import amp_settings, autocast, predict, targets
from stages.training.selection import Selection, recompute_batchnorm
from utils.env import switch
from utils.helpers import PipelineError, RunFiles, log, warn, write_csv
from utils.metrics import binary_metrics, patient_level, safe_auc, youden_threshold


CURVE_POINTS = 5  # validations per run under swa, which selects nothing on them: points of the validation curves


@dataclass
class TrainState:
    """Where training stands: saved in last.pth so --resume continues at the next epoch."""
    epoch: int = 0
    history: list = field(default_factory=list)
    best_score: list = None
    best_epoch: int = 0
    best_auc: float = float("nan")
    bad_epochs: int = 0
    bad_steps: int = 0
    stopped: bool = False
    seconds: float = 0.0
    saved_at: float = 0.0


@dataclass
class Optimisation:
    """Optimizer, LR schedule, AMP dtype and loss scaler of one run."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dtype: torch.dtype = None
    scaler: torch.amp.GradScaler = None

    def step(self, model, cfg):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self):
        return dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler else None)

    def load(self, ckpt):
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


def optimisation(model, cfg, device, batches_per_epoch):
    optimizer = build_optimizer(model, cfg, device)
    dtype, scaler = amp_settings(cfg, device)
    return Optimisation(optimizer, build_scheduler(optimizer, cfg, batches_per_epoch), dtype, scaler)



def build_optimizer(model, cfg, device):
    """AdamW (fused on CUDA, or with --fused-adamw on); a pretrained backbone at lr * backbone_lr_scale (random init at lr); no decay on biases
    and norms."""
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
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999),
                             fused=switch(cfg.fused_adamw, device))


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


def bad_step(state, cfg, epoch, step):
    state.bad_steps += 1
    warn(f"non-finite loss at epoch {epoch}, step {step}: step skipped ({state.bad_steps}/{cfg.max_bad_steps})")
    if state.bad_steps >= cfg.max_bad_steps:
        raise PipelineError(
            f"training diverged: {state.bad_steps} steps had a non-finite loss (limit --max-bad-steps "
            f"{cfg.max_bad_steps}). Lower --lr, keep --grad-clip on, or try --no-amp.")


def train_epoch(model, forward, run, bank, opt, selection, cfg, device, state, epoch):
    """One pass over fresh training tuples from `bank` (images or cached features) through `forward` (the model, or
    its compiled twin); returns (mean loss, accuracy at 0.5). The one host sync of a step reads the loss (is it finite,
    and its value for the bar); the accuracy is counted on the device."""
    model.train()
    total, seen, accum = 0.0, 0, max(1, cfg.accum_steps)
    correct = torch.zeros((), device=device)
    bar = tqdm(list(run.train_sampler), desc=f"epoch {epoch}", leave=False, disable=None, dynamic_ncols=True)
    opt.optimizer.zero_grad(set_to_none=True)
    pending = 0
    for step, (rows, labels, subtypes) in enumerate(bar, 1):
        x, mask = bank.batch(rows, device, True, model.normalization)
        labels, subtypes = targets(labels, device), targets(subtypes, device, torch.long)
        with autocast(device, opt.dtype):
            out = forward(x, mask)
            loss = run.criterion(out, labels, subtypes, x, mask)
        value = float(loss.detach())
        if not math.isfinite(value):
            bad_step(state, cfg, epoch, step)
            continue
        (opt.scaler.scale(loss / accum) if opt.scaler else loss / accum).backward()
        pending += 1
        if pending == accum:
            opt.step(model, cfg)
            selection.after_step(model)
            pending = 0
        total += value * len(rows)
        correct += ((out["binary_logits"].detach() > 0).float() == labels).sum()
        seen += len(rows)
        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    if pending:
        opt.step(model, cfg)
        selection.after_step(model)
    return (total / seen if seen else float("nan")), (float(correct) / seen if seen else float("nan"))


def validates(cfg, selection, epoch):
    """Whether this epoch scores the validation patients: every epoch for a rule that selects on them, CURVE_POINTS
    evenly spread epochs (the last among them) under swa, for the curves."""
    if selection.early_stop:
        return True
    every = max(1, math.ceil(cfg.epochs / CURVE_POINTS))
    return epoch % every == 0 or epoch == cfg.epochs


def skipped_validation():
    return dict(val_loss=np.nan, val_acc=np.nan, val_bal_acc=np.nan, val_f1=np.nan, val_auc=np.nan,
                val_auc_tuple=np.nan, threshold=np.nan)



def validation_row(tuples, res):
    """History fields from validation tuples: tuple-level metrics at 0.5, patient-level AUC and Youden threshold."""
    y = tuples["label"].to_numpy()
    m = binary_metrics(y, res["prob"], 0.5)
    patients = patient_level(tuples.assign(prob_malignant=res["prob"]))
    return dict(val_loss=res["loss"], val_acc=m["accuracy"], val_bal_acc=m["balanced_accuracy"], val_f1=m["f1"],
                val_auc=safe_auc(patients["label"], patients["prob_malignant"]), val_auc_tuple=m["auc"],
                threshold=youden_threshold(patients["label"], patients["prob_malignant"]))


def resume(folder, model, opt, selection, run, cfg):
    """Training state from checkpoints/last.pth when --resume and it exists, else a fresh state."""
    path = RunFiles(folder).last
    if not cfg.resume or not path.exists():
        return TrainState()
    ckpt = read_checkpoint(path)
    check_checkpoint(ckpt, checkpoint(model, run, cfg, 0, 0), path)
    if "optimizer" not in ckpt:
        log(f"{path} belongs to a finished run; training it again from scratch")
        return TrainState()
    load_state(model, ckpt, path)
    opt.load(ckpt)
    selection.load(ckpt.get("average"))
    set_rng_state(ckpt["rng"])
    log(f"Resuming from {path} after epoch {ckpt['state']['epoch']}")
    return TrainState(**ckpt["state"])



def epoch_line(tag, epoch, cfg, row, best):
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} bal {row['val_bal_acc']:.3f} "
           f"F1 {row['val_f1']:.3f} AUC {row['val_auc']:.3f} (tuple {row['val_auc_tuple']:.3f}) | "
           f"t {row['threshold']:.2f}") if np.isfinite(row["val_loss"]) else "val not scored this epoch (swa)"
    return (f"[{tag}] epoch {epoch:>2}/{cfg.epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
            f"{val} | lr {row['lr']:.2e} | {row['seconds']:.1f}s{' *' if best else ''}")


def save_last(model, run, opt, selection, cfg, state, row, final):
    """last.pth for --resume: at most every --checkpoint-every-s seconds, and at the run's last epoch."""
    if not final and time.time() - state.saved_at < cfg.checkpoint_every_s:
        return
    last = checkpoint(model, run, cfg, row["epoch"], state.best_auc)
    last.update(opt.state_dict(), rng=rng_state(), state=asdict(state), average=selection.state_dict())
    save(last, RunFiles(run.folder).last)
    state.saved_at = time.time()


def end_epoch(model, run, opt, selection, cfg, state, row):
    """Selection bookkeeping, best/last checkpoints and history.csv after one epoch."""
    files = RunFiles(run.folder)
    score = selection.score(state.history, row)
    improved = state.best_score is None or score > tuple(state.best_score)
    if improved:
        state.best_score, state.best_epoch, state.best_auc = list(score), row["epoch"], row["val_auc"]
        state.bad_epochs = 0
        if selection.early_stop:
            save(checkpoint(selection.kept(model), run, cfg, row["epoch"], row["val_auc"]), files.best)
    else:
        state.bad_epochs += 1
    selection.after_epoch(model, row["epoch"])
    state.history.append(row)
    state.epoch, state.seconds = row["epoch"], state.seconds + row["seconds"]
    state.stopped = selection.early_stop and state.bad_epochs >= cfg.patience
    log(epoch_line(run.tag, row["epoch"], cfg, row, improved))
    write_csv(pd.DataFrame(state.history), files.history, index=False)
    save_last(model, run, opt, selection, cfg, state, row, state.stopped or row["epoch"] == cfg.epochs)
    if state.stopped:
        log(f"[{run.tag}] early stop: validation {cfg.selection} score not better for {cfg.patience} epochs "
            f"(best epoch {state.best_epoch})")


def input_bank(cfg, run, model, epoch):
    """Cached features while the backbone is frozen (--freeze-backbone, or the first --frozen-epochs), else images."""
    frozen = run.features is not None and (cfg.freeze_backbone or epoch <= cfg.frozen_epochs)
    if model.on_features != frozen:
        model.read_features(frozen)
        log(f"[{run.tag}] epoch {epoch}: backbone {'frozen, cached features' if frozen else 'unfrozen, images'}")
    return run.features if frozen else run.bank


def finish_average(model, run, selection, cfg, state, device):
    """SWA: the averaged weights, with BatchNorm statistics from one training pass, become best.pth."""
    if selection.rule != "swa" or not state.history:
        return
    averaged = selection.average.module
    averaged.on_features = model.on_features
    run.train_sampler.set_epoch(state.epoch)
    bank = run.inputs(model)
    batches = (bank.batch(rows, device, True, model.normalization) for rows, _, _ in run.train_sampler)
    recompute_batchnorm(averaged, batches)
    state.best_epoch = state.epoch
    save(checkpoint(averaged, run, cfg, state.epoch, float("nan")), RunFiles(run.folder).best)


def fit(cfg, model, run, device, callback=None):
    """Train and select weights on the validation patients; writes history.csv, checkpoints/best.pth and last.pth;
    returns the final state with the kept weights loaded."""
    model.to(device)
    if run.features is not None:
        install_backbone(model, run.features.backbone_state)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if switch(cfg.channels_last, device):
        model.to(memory_format=torch.channels_last)
    opt = optimisation(model, cfg, device, len(run.train_sampler))
    selection = Selection(cfg, model, len(run.train_sampler) // max(1, cfg.accum_steps))
    forward = torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model
    state = resume(run.folder, model, opt, selection, run, cfg)
    curves = Curves(cfg, run, state.epoch)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.stopped:
            break
        start = time.time()
        bank = input_bank(cfg, run, model, epoch)
        run.train_sampler.set_epoch(epoch)
        loss, acc = train_epoch(model, forward, run, bank, opt, selection, cfg, device, state, epoch)
        row = dict(epoch=epoch, train_loss=loss, train_acc=acc)
        val = None
        if validates(cfg, selection, epoch):
            val = predict(selection.kept(model), bank, run.batches["val"], device, opt.dtype, run.criterion)
        row.update(validation_row(run.tuples["val"], val) if val is not None else skipped_validation())
        row.update(lr=opt.optimizer.param_groups[-1]["lr"], seconds=time.time() - start)
        end_epoch(model, run, opt, selection, cfg, state, row)
        curves.epoch(row, val)
        if callback is not None:
            callback(epoch, state)
    curves.close()
    input_bank(cfg, run, model, max(1, state.epoch))
    finish_average(model, run, selection, cfg, state, device)
    best = RunFiles(run.folder).best
    if best.exists():
        load_state(model, read_checkpoint(best, device), best)
    return state
