"""Subtype head refit on SMOTE-balanced embeddings: k-NN SMOTE and L-BFGS logistic regression in torch."""
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from utils.helpers import PipelineError, log


def smote_plan(counts, k=5):
    """Classes to grow to the largest class, and the k that the smallest of them allows."""
    top = max(counts.values())
    grow = {c: top for c, n in counts.items() if 2 <= n < top}
    single = [c for c, n in counts.items() if n < 2 and n < top]
    if single:
        log(f"SMOTE: class(es) {single} have one training tuple; left as they are")
    if not grow:
        return grow, 0
    return grow, min(k, min(counts[c] for c in grow) - 1)


def nearest(x, k):
    """Indices of the k nearest other rows of x."""
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, largest=False).indices


def smote(x, y, seed, k=5):
    """SMOTE: each class of 2+ samples grown to the largest by interpolation towards its k nearest neighbours."""
    grow, k = smote_plan(Counter(y.tolist()), k)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    xs, ys = [x], [y]
    for c, target in sorted(grow.items()):
        xc = x[y == c]
        need = target - len(xc)
        row = torch.randint(len(xc), (need,), generator=gen, device=x.device)
        col = torch.randint(k, (need,), generator=gen, device=x.device)
        step = torch.rand(need, 1, generator=gen, device=x.device, dtype=x.dtype)
        xs.append(torch.lerp(xc[row], xc[nearest(xc, k)[row, col]], step))
        ys.append(y.new_full((need,), c))
    return torch.cat(xs), torch.cat(ys)


@dataclass
class LogisticHead:
    """Standardised multinomial logistic regression; classes absent from training get probability zero."""
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    classes: torch.Tensor
    n_classes: int
    n_iter: int = 0

    def predict_proba(self, x):
        x = torch.as_tensor(x).to(self.weight)
        z = ((x - self.mean) / self.scale) @ self.weight + self.bias
        proba = x.new_zeros(len(x), self.n_classes)
        proba[:, self.classes] = z.softmax(1)
        return proba


def fit_logistic(x, y, n_classes, l2=1.0, max_iter=500, tol=1e-4):
    """Multinomial logistic regression on standardised x by full-batch L-BFGS; l2 and tol as sklearn's 1/C and tol."""
    x = torch.as_tensor(x).float()
    y = torch.as_tensor(y, device=x.device).long()
    classes, target = torch.unique(y, return_inverse=True)
    mean, scale = x.mean(0), x.std(0, correction=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z = (x - mean) / scale
    weight = x.new_zeros(x.shape[1], len(classes), requires_grad=True)
    bias = x.new_zeros(len(classes), requires_grad=True)
    n_iter = lbfgs(z, target, weight, bias, l2 / len(x), max_iter, tol) if len(classes) > 1 else 0
    return LogisticHead(mean, scale, weight.detach(), bias.detach(), classes, n_classes, n_iter)


def lbfgs(z, target, weight, bias, l2, max_iter, tol):
    """Minimise mean cross entropy + l2/2 ||W||^2 (the sklearn objective divided by C * n) until max |grad| <= tol."""
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, target) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return opt.state[weight]["n_iter"]


def class_counts(y):
    return dict(sorted(Counter(y.tolist()).items()))


def refit_subtype_head(train_x, train_y, eval_sets, n_classes, seed, device=None):
    """SMOTE-balance the training embeddings, fit the head, predict every eval set: (probabilities, class counts)."""
    x = torch.as_tensor(train_x).float().to(device)
    y = torch.as_tensor(np.asarray(train_y), device=x.device).long()
    if len(x) == 0 or len(x) != len(y):
        raise PipelineError(f"subtype head: {len(x)} training embeddings for {len(y)} labels; "
                            "both must be the same non-zero number (are the training tuples empty?)")
    if y.min() < 0 or y.max() >= n_classes:
        raise PipelineError(f"subtype head: labels must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}; "
                            "map subtype names with the run's class list")
    xb, yb = smote(x, y, seed)
    head = fit_logistic(xb, yb, n_classes)
    probs = {key: head.predict_proba(v).cpu().double().numpy() for key, v in eval_sets.items()}
    return probs, dict(before=class_counts(y), after=class_counts(yb))
