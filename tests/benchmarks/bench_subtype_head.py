"""The SMOTE subtype head at full size: the library head (utils/subtype_head.py: imbalanced-learn SMOTE, scikit-learn
StandardScaler + LogisticRegression) against the torch head it replaced (k-NN SMOTE and full-batch L-BFGS, copied here).

python tests/benchmarks/bench_subtype_head.py [--n 7000] [--held-out 2000] [--dim 512] [--latent 32] [--sep 0.4]
    [--seed 0] [--device cpu|cuda] [--threads N] [--blas-threads 1]
    [--try lbfgs:1e-4:float32,newton-cg:1e-4:float64]

Embeddings: 8 classes in the BreakHis subtype proportions (ductal carcinoma ~44 %, adenosis ~6 %), class means in a
--latent-dimensional subspace (--sep apart) plus noise, projected to --dim features, ReLU'd like pooled CNN features.
Both heads train on the --n rows (SMOTE to the largest class, then the fit) and predict --held-out rows drawn alike.
Printed: SMOTE and fit seconds, iterations, the multinomial objective at the fit (mean cross entropy + ||W||^2 / 2n
on the standardised SMOTE rows; same objective, lower is closer to the optimum), held-out accuracy and balanced
accuracy; then each --try setting (solver:tol:dtype of the rows) of the library fit on the library's SMOTE rows.
--threads caps the torch head's threads; --blas-threads sets the library head's BLAS threads (utils/subtype_head.py's
BLAS_THREADS, 1 there: on a busy CPU OpenBLAS threads wait on each other and the fit crawls).
The last line reads `subtype head: library S1 s + F1 s, torch S2 s + F2 s, accuracy A1 vs A2, same predictions P %`
(the library head as utils/subtype_head.py runs it).
"""
import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import utils.subtype_head as subtype_head  # noqa: E402
from utils.subtype_head import DTYPE, class_counts, fit_logistic, probabilities, smote, smote_plan  # noqa: E402

BREAKHIS_SUBTYPES = dict(adenosis=444, fibroadenoma=1014, phyllodes_tumor=453, tubular_adenoma=569,
                         ductal_carcinoma=3451, lobular_carcinoma=626, mucinous_carcinoma=792, papillary_carcinoma=560)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=7000, help="training embeddings")
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--sep", type=float, default=0.4, help="class-mean spread in latent units (noise std 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="the torch head's device")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--blas-threads", type=int, default=subtype_head.BLAS_THREADS,
                   help="the library head's BLAS threads")
    p.add_argument("--try", dest="settings", default="lbfgs:1e-4:float32,newton-cg:1e-4:float64",
                   help="more library fits, solver:tol:dtype, comma-separated ('' for none)")
    return p.parse_args()


def embeddings(n, held_out, dim, latent, sep, seed):
    """(train x, train y, held-out x, held-out y): skewed classes, structured in a latent subspace."""
    rng = np.random.default_rng(seed)
    share = np.array(list(BREAKHIS_SUBTYPES.values()), float)
    share /= share.sum()
    means = rng.normal(scale=sep, size=(len(share), latent))
    proj = rng.normal(scale=latent ** -0.5, size=(latent, dim))

    def draw(m):
        y = rng.choice(len(share), size=m, p=share)
        z = means[y] + rng.normal(size=(m, latent))
        return np.maximum(z @ proj + 0.3 * rng.normal(size=(m, dim)), 0).astype(np.float32), y
    return *draw(n), *draw(held_out)


# The torch head before utils/subtype_head.py moved to imbalanced-learn and scikit-learn, kept for this comparison.
def nearest(x, k):
    """Indices of the k nearest other rows of x."""
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, largest=False).indices


def torch_smote(x, y, seed, k=5):
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


def torch_fit_logistic(x, y, n_classes, l2=1.0, max_iter=500, tol=1e-4):
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


def objective(z, y, w, b):
    """Mean cross entropy + ||W||^2 / 2n (C=1, multinomial) of weights w (features, classes) on standardised z."""
    logits = z @ w + b
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean() + (w ** 2).sum() / (2 * len(y)))


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def library_fit(xb, yb, seed, solver="lbfgs", tol=1e-4):
    """(pipeline, fit seconds, objective, iterations) for one library setting."""
    start = time.perf_counter()
    pipe = fit_logistic(xb, yb, seed, solver=solver, tol=tol) if solver else fit_logistic(xb, yb, seed)
    seconds = time.perf_counter() - start
    model = pipe[-1]
    value = objective(pipe[0].transform(xb), yb, model.coef_.T, model.intercept_)
    return pipe, seconds, value, int(model.n_iter_.max())


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    subtype_head.BLAS_THREADS = args.blas_threads
    x, y, hx, hy = embeddings(args.n, args.held_out, args.dim, args.latent, args.sep, args.seed)
    print(f"{args.n} x {args.dim} training embeddings, {args.held_out} held out, counts {class_counts(y)}; "
          f"torch on {args.device}, {torch.get_num_threads()} torch threads, library BLAS threads {args.blas_threads}")

    start = time.perf_counter()
    xb, yb = smote(x.astype(DTYPE), y, args.seed)
    lib_smote = time.perf_counter() - start
    pipe, lib_fit, lib_obj, lib_iter = library_fit(xb, yb, args.seed, None)
    lib_pred = probabilities(pipe, np.unique(yb), hx.astype(DTYPE), len(BREAKHIS_SUBTYPES)).argmax(1)

    tx, ty = torch.as_tensor(x, device=args.device), torch.as_tensor(y, device=args.device)
    torch_smote(tx[:64], ty[:64], args.seed)
    torch_fit_logistic(tx[:64], ty[:64], len(BREAKHIS_SUBTYPES), max_iter=2)
    sync(args.device)
    start = time.perf_counter()
    txb, tyb = torch_smote(tx, ty, args.seed)
    sync(args.device)
    torch_smote_s = time.perf_counter() - start
    start = time.perf_counter()
    head = torch_fit_logistic(txb, tyb, len(BREAKHIS_SUBTYPES))
    sync(args.device)
    torch_fit_s = time.perf_counter() - start
    torch_pred = head.predict_proba(hx).argmax(1).cpu().numpy()
    zb = ((txb - head.mean) / head.scale).double().cpu().numpy()
    torch_obj = objective(zb, tyb.cpu().numpy(), head.weight.double().cpu().numpy(), head.bias.double().cpu().numpy())

    lib_acc, torch_acc = (lib_pred == hy).mean(), (torch_pred == hy).mean()
    same = 100 * (lib_pred == torch_pred).mean()
    print(f"after SMOTE: library {class_counts(yb)}, torch {class_counts(tyb.cpu().numpy())}")
    print(f"{'head':<32}{'smote s':>8}{'fit s':>8}{'iters':>6}{'objective':>11}{'acc':>7}{'bal acc':>8}")
    rows = [(f"library (module) {np.dtype(DTYPE).name}", lib_smote, lib_fit, lib_iter, lib_obj, lib_pred),
            (f"torch L-BFGS float32 {args.device}", torch_smote_s, torch_fit_s, head.n_iter, torch_obj, torch_pred)]
    for setting in filter(None, args.settings.split(",")):
        solver, tol, dtype = setting.split(":")
        other, seconds, value, iters = library_fit(xb.astype(dtype), yb, args.seed, solver, float(tol))
        pred = probabilities(other, np.unique(yb), hx.astype(dtype), len(BREAKHIS_SUBTYPES)).argmax(1)
        rows.append((f"library {solver} {tol} {dtype}", float("nan"), seconds, iters, value, pred))
    for name, s, f, iters, value, pred in rows:
        print(f"{name:<32}{s:>8.2f}{f:>8.2f}{iters:>6}{value:>11.6f}{(pred == hy).mean():>7.3f}"
              f"{balanced_accuracy_score(hy, pred):>8.3f}  same as module {100 * (pred == lib_pred).mean():.1f} %")
    print(f"subtype head: library {lib_smote:.2f} s + {lib_fit:.2f} s, torch {torch_smote_s:.2f} s + "
          f"{torch_fit_s:.2f} s, accuracy {lib_acc:.3f} vs {torch_acc:.3f}, same predictions {same:.1f} %")


if __name__ == "__main__":
    main()
