"""Figures in one style: confusion matrices, ROC, training curves, calibration, magnification weights, heatmaps."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.lines  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from sklearn.metrics import auc as area, confusion_matrix, roc_curve  # noqa: E402

from utils.metrics import expected_calibration_error  # noqa: E402

DPI = 150
PALETTE = "colorblind"
CLASS_NAMES = ("benign", "malignant")


def setup_style():
    sns.set_theme(style="whitegrid", palette=PALETTE, font_scale=0.95)
    plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "axes.titleweight": "bold", "legend.frameon": True})


def colors(n=10):
    return sns.color_palette(PALETTE, n)


def save(fig, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def confusion(y, pred, labels, title, path):
    """Counts with row percentages; rows are the true class."""
    cm = confusion_matrix(y, pred, labels=list(range(len(labels))))
    rows = cm.sum(1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0) * 100
    text = np.array([[f"{c}\n{p:.1f}%" for c, p in zip(rc, rp)] for rc, rp in zip(cm, pct)])
    side = max(4.0, 0.75 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    sns.heatmap(pct, annot=text, fmt="", cmap="Blues", vmin=0, vmax=100, square=True, ax=ax,
                xticklabels=labels, yticklabels=labels, cbar_kws={"label": "row %"},
                annot_kws={"fontsize": 9 if len(labels) < 6 else 7})
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    plt.setp(ax.get_yticklabels(), rotation=0)
    return save(fig, path)


def mean_roc(curves, grid):
    tprs = []
    for y, p in curves:
        fpr, tpr, _ = roc_curve(y, p)
        tpr = np.interp(grid, fpr, tpr)
        tpr[0] = 0.0
        tprs.append(tpr)
    return np.array(tprs)


def roc_folds(curves, title, path):
    """One ROC curve per fold plus the mean with a ±1 std band; curves: list of (name, y, p)."""
    curves = [(n, y, p) for n, y, p in curves if len(np.unique(y)) == 2]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    palette = colors(len(curves) + 1)
    aucs = []
    for (name, y, p), color in zip(curves, palette):
        fpr, tpr, _ = roc_curve(y, p)
        aucs.append(area(fpr, tpr))
        ax.plot(fpr, tpr, color=color, lw=1, alpha=0.6, label=f"{name} (AUC = {aucs[-1]:.3f})")
    if len(curves) > 1:
        grid = np.linspace(0, 1, 201)
        tprs = mean_roc([(y, p) for _, y, p in curves], grid)
        mean, std = tprs.mean(0), tprs.std(0)
        mean[-1] = 1.0
        ax.plot(grid, mean, color="black", lw=2, label=f"mean (AUC = {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f})")
        ax.fill_between(grid, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="grey", alpha=0.25,
                        label="± 1 std")
    if not curves:
        ax.text(0.5, 0.5, "only one class in the test set:\nno ROC curve", ha="center", va="center")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7.5)
    return save(fig, path)


def roc_models(models, title, path):
    """Mean ROC per model over its folds; models: {name: [(y, p), ...]}, the first drawn boldest."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    grid = np.linspace(0, 1, 201)
    for (name, curves), color in zip(models.items(), colors(max(len(models), 1))):
        curves = [(y, p) for y, p in curves if len(np.unique(y)) == 2]
        if not curves:
            continue
        mean = mean_roc(curves, grid).mean(0)
        mean[-1] = 1.0
        aucs = [area(*roc_curve(y, p)[:2]) for y, p in curves]
        lw = 2.2 if name == next(iter(models)) else 1.2
        ax.plot(grid, mean, color=color, lw=lw, label=f"{name} (AUC = {np.mean(aucs):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    return save(fig, path)


def training_curves(histories, title, path):
    """Loss, accuracy, AUC and learning rate per epoch; histories: {split: history DataFrame}; solid train, dashed val."""
    panels = [("Loss", ["train_loss", "val_loss"]), ("Accuracy", ["train_acc", "val_acc"]),
              ("Validation AUC", ["val_auc"]), ("Learning rate", ["lr"])]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    palette = colors(max(len(histories), 1))
    for ax, (name, series) in zip(axes.flat, panels):
        for (split, hist), color in zip(histories.items(), palette):
            for col in series:
                if col in hist and hist[col].notna().any():
                    style = "--" if col.startswith("val") and len(series) > 1 else "-"
                    ax.plot(hist["epoch"], hist[col], style, color=color, marker="o", ms=3, lw=1.3)
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if name == "Learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    handles = [matplotlib.lines.Line2D([], [], color=c, lw=2, label=s) for s, c in zip(histories, palette)]
    handles += [matplotlib.lines.Line2D([], [], color="grey", ls=ls, label=lab)
                for ls, lab in (("-", "train"), ("--", "validation"))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(title, fontsize=11, fontweight="bold")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, path)


def reliability(y, p, title, path, n_bins=10):
    """Reliability diagram (fraction malignant vs mean P(malignant) per bin) with the ECE in the title; returns the ECE."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    ece = expected_calibration_error(y, p, n_bins)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    centers = (np.arange(n_bins) + 0.5) / n_bins
    counts = np.bincount(bins, minlength=n_bins)
    frac = np.array([y[bins == b].mean() if counts[b] else np.nan for b in range(n_bins)])
    conf = np.array([p[bins == b].mean() if counts[b] else np.nan for b in range(n_bins)])
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    palette = colors(3)
    ax.bar(centers, frac, width=1 / n_bins, edgecolor="black", color=palette[0], alpha=0.8, label="fraction malignant")
    ax.plot(conf, frac, "o", color=palette[1], ms=4, label="observed vs mean predicted (per bin)")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(ylim=(0, 1), ylabel="Fraction malignant")
    ax.set_title(f"{title}\nECE = {ece:.4f} ({n_bins} bins, n = {len(y)})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centers, counts, width=1 / n_bins, edgecolor="black", color=palette[2])
    hist.set(xlim=(0, 1), xlabel="Predicted P(malignant)", ylabel="count")
    fig.tight_layout()
    save(fig, path)
    return ece


def confidence_distribution(y, p, threshold, title, path):
    """P(malignant) by true class, and confidence of correct vs wrong predictions."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    threshold = np.broadcast_to(np.asarray(threshold, dtype=float), p.shape)
    correct = (p >= threshold).astype(int) == y
    confidence = np.where(p >= threshold, p, 1 - p)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    palette = colors(4)
    bins = np.linspace(0, 1, 21)
    for label, name in enumerate(CLASS_NAMES):
        if (y == label).any():
            axes[0].hist(p[y == label], bins=bins, alpha=0.6, color=palette[label], edgecolor="black",
                         label=f"true {name} (n={int((y == label).sum())})")
    if np.ptp(threshold) == 0:
        axes[0].axvline(threshold[0], color="black", ls="--", lw=1, label=f"threshold {threshold[0]:.3f}")
    axes[0].set(xlabel="Predicted P(malignant)", ylabel="count", title="Probability by true class")
    for flag, name, color in ((True, "correct", palette[2]), (False, "wrong", palette[3])):
        if (correct == flag).any():
            axes[1].hist(confidence[correct == flag], bins=bins, alpha=0.6, color=color,
                         edgecolor="black", label=f"{name} (n={int((correct == flag).sum())})")
    axes[1].set(xlabel="Predicted probability of the predicted class", ylabel="count",
                title="Confidence of correct and wrong predictions")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11, fontweight="bold")
    fig.tight_layout()
    return save(fig, path)


def magnification_weights(tidy, title, path):
    """Bars of mean ± std weight per magnification and class; tidy: DataFrame(kind, magnification, class, weight)."""
    kinds = [k for k in ("CMF importance", "HMA level weight") if k in set(tidy["kind"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        part = tidy[tidy["kind"] == kind]
        sns.barplot(data=part, x="magnification", y="weight", hue="class", errorbar="sd", capsize=0.1, ax=ax,
                    palette=PALETTE, hue_order=[c for c in ("all", *CLASS_NAMES) if c in set(part["class"])],
                    order=list(dict.fromkeys(part["magnification"])))
        ax.axhline(1 / part["magnification"].nunique(), color="grey", ls="--", lw=1, label="uniform weight")
        ax.set(title=f"{kind} (mean ± std over test tuples)", ylabel="weight", xlabel="magnification")
        handles, labels = ax.get_legend_handles_labels()
        ax.get_legend().remove()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(title, fontsize=11, fontweight="bold")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save(fig, path)


def overlay_panels(images, maps, mask, used, mags, title, path, map_name, captions=None):
    """Row 1 the tuple's images, row 2 the heatmaps over them; missing or unused magnifications say so."""
    m = len(mags)
    fig, axes = plt.subplots(2, m, figsize=(2.9 * m, 6.2), squeeze=False)
    shown = None
    for j, mag in enumerate(mags):
        top, bottom = axes[0, j], axes[1, j]
        top.set_title(mag if captions is None else f"{mag}\n{captions[j]}", fontsize=9)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        if not mask[j]:
            for ax in (top, bottom):
                ax.set_facecolor("#eeeeee")
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        top.imshow(images[j])
        bottom.imshow(images[j])
        if not used[j]:
            bottom.text(0.5, 0.5, "not used\nby this model", ha="center", va="center", transform=bottom.transAxes,
                        color="white", fontsize=9, bbox=dict(facecolor="black", alpha=0.6))
            continue
        shown = bottom.imshow(maps[j], cmap="jet", alpha=0.45, vmin=0, vmax=1,
                              extent=(-0.5, images[j].shape[1] - 0.5, images[j].shape[0] - 0.5, -0.5))
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel(map_name, fontsize=9)
    fig.suptitle(title, fontsize=10, fontweight="bold")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    if shown is not None:
        cax = fig.add_axes([0.94, 0.1, 0.012, 0.35])
        fig.colorbar(shown, cax=cax, label=map_name)
    return save(fig, path)


def note_figure(text, path):
    """A small figure that says why a panel set is empty."""
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, wrap=True)
    return save(fig, path)


def weight_tidy(frame, mags):
    """Long table (kind, magnification, class, weight) of CMF and HMA weights over present magnifications."""
    rows = []
    for kind, prefix in (("CMF importance", "w"), ("HMA level weight", "hma")):
        for mag in mags:
            col = f"{prefix}_{mag}"
            if col not in frame or frame[col].isna().all():
                continue
            present = frame[frame[f"mask_{mag}"] == 1] if f"mask_{mag}" in frame else frame
            for label, weight in zip(present["label"].astype(int), present[col].astype(float)):
                rows.append((kind, mag, "all", weight))
                rows.append((kind, mag, CLASS_NAMES[label], weight))
    return pd.DataFrame(rows, columns=["kind", "magnification", "class", "weight"])


def importance_plot(frame, mags, title, path):
    """CMF and HMA weights of the magnifications present, per class; None when the frame has no weights."""
    tidy = weight_tidy(frame, mags)
    if tidy.empty:
        return None
    return magnification_weights(tidy, title, path)


def workload(curves, points, title, path):
    """Share of patients cleared against sensitivity, one curve per model; points: (model, sensitivity, cleared,
    label) operating points marked on them."""
    fig, ax = plt.subplots(figsize=(6, 5))
    palette = dict(zip(curves, colors(max(len(curves), 1))))
    for name, (sens, cleared) in curves.items():
        ax.step(sens, cleared, where="post", color=palette[name], lw=1.5, label=name)
    for name, sens, cleared, label in points:
        ax.plot(sens, cleared, "o", color=palette.get(name, "black"), ms=6, mec="black")
        ax.annotate(label, (sens, cleared), textcoords="offset points", xytext=(-4, 6), fontsize=7, ha="right")
    ax.set(xlim=(0.5, 1.01), ylim=(0, 1), xlabel="Sensitivity (malignant patients flagged)",
           ylabel="Share of patients cleared (predicted benign)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save(fig, path)


def effects(table, what, value, group, title, xlabel, path):
    """One point per row of `table` at `value` with its CI (`value`_ci_low/high), rows named by `what`, one colour per
    `group`, a line at no change."""
    names = list(dict.fromkeys(table[what]))
    groups = list(dict.fromkeys(table[group]))
    palette = dict(zip(groups, colors(max(len(groups), 1))))
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(names) + 1.5))
    step = 0.8 / max(len(groups), 1)
    for k, name in enumerate(groups):
        rows = table[table[group] == name]
        y = np.array([names.index(n) for n in rows[what]]) + (k - (len(groups) - 1) / 2) * step
        x = rows[value].to_numpy(float)
        err = np.abs(np.vstack([x - rows[f"{value}_ci_low"].to_numpy(float), rows[f"{value}_ci_high"].to_numpy(float) - x]))
        ax.errorbar(x, y, xerr=np.nan_to_num(err), fmt="o", ms=4, color=palette[name], label=name, capsize=2)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return save(fig, path)
