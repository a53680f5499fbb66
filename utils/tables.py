"""Result tables rebuilt from the run folders: metrics recomputed from predictions.csv, mean ± std over folds, CIs."""
import numpy as np
import pandas as pd
from scipy.stats import rankdata

from utils.helpers import log, read_json, runs_dir, tables_dir
from utils.metrics import binary_metrics, bootstrap_ci, patient_level, sensitivity_threshold, subtype_metrics
from utils.metrics import youden_threshold

LEVELS = ("tuple", "patient")
BINARY = ["accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auc"]
KEY = ["accuracy", "balanced_accuracy", "f1", "auc"]
SUBTYPE = ["subtype_macro_f1", "subtype_micro_f1", "subtype_balanced_accuracy"]
RULES = {"fixed_0.5": None, "val_youden": youden_threshold, "val_sens95": sensitivity_threshold}
REFERENCE = "mmnet"
ABLATIONS = ["mmnet_no_spatial", "mmnet_no_channel", "mmnet_no_hma", "mmnet_no_cmf"]
EFFICIENCY = ["model", "params", "params_m", "macs", "flops", "macs_g", "flops_g", "ms_per_tuple", "ms_per_patient",
              "tuples_per_patient", "image_size", "device", "checkpoint"]
TABLE_NAMES = {
    "cv": "table_1_cross_validation_k_fold_results.csv",
    "fixed": "table_2_patient_wise_results.csv",
    "ablation": "table_3_ablation_results.csv",
    "baseline": "table_4_baseline_comparison.csv",
    "magnification": "table_5_per_magnification_results.csv",
    "subtype": "table_subtype_per_class.csv",
    "efficiency": "table_efficiency.csv",
}


def split_order(name):
    return (name == "fixed", int(name.split("_")[-1]) if name.startswith("fold_") else 0, name)


def load_run(folder):
    """predictions, history and metrics.json of one run folder."""
    metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").exists() else {}
    history = folder / "history.csv"
    pred = pd.read_csv(folder / "predictions.csv", dtype={"patient_id": str, "group": str})
    classes = metrics.get("classes") or sorted(set(pred.get("subtype_label", pd.Series(dtype=str)).dropna()))
    return dict(
        folder=folder, pred=pred, metrics=metrics, classes=list(classes), cache={},
        history=pd.read_csv(history) if history.exists() else None,
        checkpoint=folder / "checkpoints" / "best.pth",
    )


def load_runs(cfg):
    """{run_name: {split_name: run}} for every run folder holding predictions.csv."""
    runs = {}
    for path in sorted(runs_dir(cfg).glob("*/*/predictions.csv")):
        runs.setdefault(path.parent.parent.name, {})[path.parent.name] = load_run(path.parent)
    return {name: dict(sorted(splits.items(), key=lambda kv: split_order(kv[0]))) for name, splits in runs.items()}


def cv_splits(splits):
    return [s for s in splits if s.startswith("fold_")]


def level_frame(pred, level, role):
    """Rows of one level and role; patient rows are built from the tuples when the file has none."""
    rows = pred[(pred["level"] == level) & (pred["role"] == role)]
    if len(rows) or level == "tuple":
        return rows.reset_index(drop=True)
    tuples = pred[(pred["level"] == "tuple") & (pred["role"] == role)]
    return patient_level(tuples) if len(tuples) else rows


def threshold(run, rule):
    """The rule's threshold, chosen on the validation tuples and applied unchanged at both levels."""
    if RULES[rule] is None:
        return 0.5
    val = level_frame(run["pred"], "tuple", "val")
    if len(val) == 0:
        saved = run["metrics"].get("threshold", {}).get(rule.replace("val_", ""))
        return float(saved) if saved is not None else 0.5
    return RULES[rule](val["label"].to_numpy(), val["prob_malignant"].to_numpy())


def scored_frame(run, level, rule):
    """Test rows of one level with the rule's threshold in a `thr` column."""
    key = (level, rule)
    if key not in run["cache"]:
        frame = level_frame(run["pred"], level, "test").copy()
        frame["thr"] = threshold(run, rule)
        run["cache"][key] = frame
    return run["cache"][key]


def rank_auc(y, p):
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fast_metric(name):
    """One key metric of a test frame (per-row thresholds), quick enough for the bootstrap."""
    def score(frame):
        y = frame["label"].to_numpy().astype(int)
        p = frame["prob_malignant"].to_numpy(dtype=float)
        if name == "auc":
            return rank_auc(y, p)
        pred = (p >= frame["thr"].to_numpy(dtype=float)).astype(int)
        if name == "accuracy":
            return float((pred == y).mean())
        tp, fp = int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum())
        fn = int(((pred == 0) & (y == 1)).sum())
        if name == "f1":
            return 2 * tp / (2 * tp + fp + fn) if tp + fn else float("nan")
        tn = len(y) - tp - fp - fn
        if tp + fn == 0 or tn + fp == 0:
            return float("nan")
        return (tp / (tp + fn) + tn / (tn + fp)) / 2
    return score


def confidence_intervals(frame, cfg):
    """95 % percentile CIs of the key metrics when patients are resampled."""
    row = {}
    frame = frame[["patient_id", "label", "prob_malignant", "thr"]]
    for name in KEY:
        low, high = bootstrap_ci(frame, fast_metric(name), n=cfg.bootstrap, seed=cfg.seed)
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
    return row


def binary_scores(frame):
    """binary_metrics of a test frame at its threshold; pooled folds keep each fold's own threshold."""
    if len(frame) == 0:
        return {}
    y, p = frame["label"].to_numpy().astype(int), frame["prob_malignant"].to_numpy(dtype=float)
    thr = frame["thr"].to_numpy()
    if np.ptp(thr) == 0:
        m = binary_metrics(y, p, float(thr[0]))
        return {k: m[k] for k in BINARY + ["threshold", "n"]}
    m = binary_metrics(y, (p >= thr).astype(float), 0.5)
    m.update(auc=rank_auc(y, p), threshold=float("nan"))
    return {k: m[k] for k in BINARY + ["threshold", "n"]}


def subtype_frame(run, level, role="test"):
    frame = level_frame(run["pred"], level, role)
    if "subtype_label" not in frame or frame["subtype_label"].isna().all():
        return frame.iloc[:0]
    return frame


def subtype_result(run, level, column="subtype_pred"):
    """subtype_metrics of the test rows for one prediction column, or None when the run has none."""
    frame = subtype_frame(run, level)
    classes = run["classes"]
    if column not in frame or frame[column].isna().all() or not classes:
        return None
    frame = frame[frame["subtype_label"].isin(classes) & frame[column].isin(classes)]
    index = {c: i for i, c in enumerate(classes)}
    return subtype_metrics(frame["subtype_label"].map(index), frame[column].map(index), classes)


def subtype_summary(run, level):
    m = subtype_result(run, level)
    if m is None:
        return {}
    return dict(subtype_macro_f1=m["macro_f1"], subtype_micro_f1=m["micro_f1"],
                subtype_balanced_accuracy=m["balanced_accuracy"])


def split_rows(name, splits, rules, cfg):
    """One row per split, level and threshold rule, plus the test frames for pooling."""
    rows, frames = [], {}
    for split, run in splits.items():
        for level in LEVELS:
            subtype = subtype_summary(run, level)
            for rule in rules:
                frame = scored_frame(run, level, rule)
                if len(frame) == 0:
                    continue
                row = dict(model=name, split=split, level=level, threshold_rule=rule,
                           n_patients=frame["patient_id"].nunique())
                row.update(binary_scores(frame), **subtype, **confidence_intervals(frame, cfg))
                rows.append(row)
                frames.setdefault((level, rule), []).append(frame)
    return rows, frames


def mean_std_rows(rows, frames, cfg, pooled_subtype):
    """Per level and rule: 'pooled' (all folds' test patients, with CIs), 'mean', 'std' and 'mean ± std' over folds."""
    table = pd.DataFrame(rows)
    numeric = [c for c in BINARY + SUBTYPE if c in table]
    out = []
    for (name, level, rule), group in table.groupby(["model", "level", "threshold_rule"], sort=False):
        mean, std = group[numeric].mean(), group[numeric].std(ddof=1)
        pooled = pd.concat(frames[(level, rule)], ignore_index=True)
        base = dict(model=name, level=level, threshold_rule=rule, n_folds=len(group))
        out.append(dict(base, split="pooled", n_patients=pooled["patient_id"].nunique(), **binary_scores(pooled),
                        **pooled_subtype.get(level, {}), **confidence_intervals(pooled, cfg)))
        out.append(dict(base, split="mean", **mean.to_dict()))
        out.append(dict(base, split="std", **std.to_dict()))
        out.append(dict(base, split="mean ± std", **{k: mean_std_text(mean[k], std[k]) for k in numeric}))
    return out


def mean_std_text(mean, std):
    if not np.isfinite(mean):
        return ""
    return f"{mean:.4f}" if not np.isfinite(std) else f"{mean:.4f} ± {std:.4f}"


def cv_table(runs, cfg, notes):
    splits = runs.get(REFERENCE, {})
    folds = {s: splits[s] for s in cv_splits(splits)}
    if not folds:
        notes.append("table 1: no cross-validation run of mmnet (run the 'cv' stage).")
        return pd.DataFrame()
    rows, frames = split_rows(REFERENCE, folds, ["fixed_0.5", "val_youden"], cfg)
    pooled = pooled_run(folds, list(folds))
    pooled_subtype = {level: subtype_summary(pooled, level) for level in LEVELS}
    table = pd.DataFrame(rows + mean_std_rows(rows, frames, cfg, pooled_subtype))
    table["n_folds"] = table["n_folds"].fillna(1).astype(int)
    return table


def fixed_table(runs, cfg, notes):
    run = runs.get(REFERENCE, {}).get("fixed")
    if run is None:
        notes.append("table 2: no fixed-split run of mmnet (run the 'fixed' stage).")
        return pd.DataFrame()
    rows, _ = split_rows(REFERENCE, {"fixed": run}, list(RULES), cfg)
    return pd.DataFrame(rows)


def shared_splits(splits, reference):
    """CV folds both runs finished; the fixed split when they share no fold."""
    folds = [s for s in cv_splits(splits) if s in reference]
    if folds:
        return folds
    return ["fixed"] if "fixed" in splits and "fixed" in reference else []


def fold_scores(splits, names, level, rule="val_youden"):
    return pd.DataFrame([binary_scores(scored_frame(splits[s], level, rule)) for s in names])


def comparison_rows(name, splits, reference, cfg, diff):
    """Mean ± std over the folds shared with mmnet, pooled CIs and mmnet minus this model."""
    shared = shared_splits(splits, reference)
    rows = []
    for level in LEVELS:
        own = fold_scores(splits, shared, level)
        ref = fold_scores(reference, shared, level)
        pooled = pd.concat([scored_frame(splits[s], level, "val_youden") for s in shared], ignore_index=True)
        row = dict(model=name, level=level, threshold_rule="val_youden", folds=" ".join(shared), n_folds=len(shared),
                   n_patients=pooled["patient_id"].nunique())
        for m in KEY + ["precision", "recall", "specificity"]:
            row[f"{m}_mean"], row[f"{m}_std"] = own[m].mean(), own[m].std(ddof=1)
        scores = binary_scores(pooled)
        row.update({f"{m}_pooled": scores[m] for m in KEY})
        row.update(confidence_intervals(pooled, cfg))
        for m in KEY:
            row[f"{m}_{diff}"] = ref[m].mean() - own[m].mean()
        rows.append(row)
    return rows


def comparison_table(runs, names, cfg, notes, diff, label):
    reference = runs.get(REFERENCE)
    if reference is None:
        notes.append(f"{label}: no mmnet run to compare against (run the 'cv' stage).")
        return pd.DataFrame()
    rows = []
    for name in [REFERENCE] + names:
        splits = runs.get(name)
        if splits is None:
            notes.append(f"{label}: {name} has no finished run, skipped.")
            continue
        if not shared_splits(splits, reference):
            notes.append(f"{label}: {name} shares no split with mmnet, skipped.")
            continue
        rows += comparison_rows(name, splits, reference, cfg, diff)
    return pd.DataFrame(rows)


def with_efficiency(table, efficiency):
    if table.empty:
        return table
    cols = ["model", "params", "params_m", "macs_g", "flops_g", "ms_per_tuple", "ms_per_patient"]
    return table.merge(efficiency[cols], on="model", how="left")


def ablation_names(cfg):
    return ABLATIONS + [f"mmnet_only_{m}" for m in cfg.magnifications] + ["simple_concat"]


def baseline_names(cfg):
    return ["simple_concat"] + [f"single_{m}" for m in cfg.magnifications] + ["resnet50_transfer"]


def ablation_table(runs, cfg, notes, efficiency):
    return with_efficiency(comparison_table(runs, ablation_names(cfg), cfg, notes, "drop", "table 3"), efficiency)


def baseline_table(runs, cfg, notes, efficiency):
    table = with_efficiency(comparison_table(runs, baseline_names(cfg), cfg, notes, "improvement", "table 4"), efficiency)
    if table.empty:
        return table
    table["auc_per_m_params"] = table["auc_mean"] / table["params_m"]
    ref = table.loc[table["model"] == REFERENCE, "ms_per_patient"]
    table["time_vs_mmnet"] = table["ms_per_patient"] / ref.iloc[0] if len(ref) else np.nan
    return table


def weight_frame(runs):
    """mmnet test tuples (pooled CV folds, else the fixed split) with their CMF and HMA weights."""
    splits = runs.get(REFERENCE, {})
    names = cv_splits(splits) or [s for s in splits if s == "fixed"]
    frames = [level_frame(splits[s]["pred"], "tuple", "test") for s in names]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), names


def weight_stats(frame, mag, prefix):
    """Mean ± std of one magnification's weight over the test tuples where it is present."""
    col = f"{prefix}_{mag}"
    if frame.empty or col not in frame or frame[col].isna().all():
        return {}
    present = frame[frame[f"mask_{mag}"] == 1] if f"mask_{mag}" in frame else frame
    name = "cmf_weight" if prefix == "w" else "hma_weight"
    row = {f"{name}_mean": present[col].mean(), f"{name}_std": present[col].std(ddof=1)}
    for label, cls in ((0, "benign"), (1, "malignant")):
        row[f"{name}_{cls}_mean"] = present.loc[present["label"] == label, col].mean()
    return row


def magnification_table(runs, cfg, notes):
    weights, source = weight_frame(runs)
    if weights.empty:
        notes.append("table 5: no mmnet test predictions, CMF importance left out.")
    rows = []
    for mag in cfg.magnifications:
        importance = dict(weight_stats(weights, mag, "w"), **weight_stats(weights, mag, "hma"),
                          weights_from=" ".join(source))
        found = False
        for name in (f"single_{mag}", f"mmnet_only_{mag}"):
            splits = runs.get(name)
            if splits is None:
                continue
            found = True
            names = cv_splits(splits) or list(splits)
            for level in LEVELS:
                scores = fold_scores(splits, names, level)
                row = dict(magnification=mag, model=name, level=level, folds=" ".join(names), n_folds=len(names))
                for m in KEY:
                    row[f"{m}_mean"], row[f"{m}_std"] = scores[m].mean(), scores[m].std(ddof=1)
                rows.append(dict(row, **importance))
        if not found:
            notes.append(f"table 5: no single_{mag} or mmnet_only_{mag} run; only the CMF weight is listed.")
            rows.append(dict(magnification=mag, **importance))
    table = pd.DataFrame(rows)
    if "cmf_weight_mean" in table:
        ranks = table.drop_duplicates("magnification").set_index("magnification")["cmf_weight_mean"].rank(ascending=False)
        table["cmf_rank"] = table["magnification"].map(ranks)
    return table


def per_class_rows(name, split, run_or_frame, level, classes):
    rows = []
    for column, smote in (("subtype_pred", "no"), ("subtype_pred_smote", "yes")):
        m = subtype_result(run_or_frame, level, column)
        if m is None:
            continue
        base = dict(model=name, split=split, level=level, smote=smote)
        present = [c for c in classes if m["per_class"][c]["support"] > 0]
        for c in classes:
            rows.append(dict(base, subtype=c, **m["per_class"][c]))
        macro = {k: float(np.mean([m["per_class"][c][k] for c in present])) if present else np.nan
                 for k in ("precision", "recall")}
        rows.append(dict(base, subtype="macro avg", **macro, f1=m["macro_f1"], support=m["n"]))
        micro = m["micro_f1"]
        rows.append(dict(base, subtype="micro avg", precision=micro, recall=micro, f1=micro, support=m["n"]))
    return rows


def pooled_run(splits, names):
    """A run-like dict whose predictions are the concatenated test rows of several splits."""
    first = splits[names[0]]
    pred = pd.concat([splits[s]["pred"][splits[s]["pred"]["role"] == "test"] for s in names], ignore_index=True)
    return dict(pred=pred, classes=first["classes"], metrics={}, cache={})


def subtype_table(runs, notes):
    splits = runs.get(REFERENCE, {})
    if not splits:
        notes.append("subtype table: no mmnet run.")
        return pd.DataFrame()
    rows = []
    folds = cv_splits(splits)
    parts = dict(splits)
    if len(folds) > 1:
        parts["pooled_cv"] = pooled_run(splits, folds)
    for split, run in parts.items():
        for level in LEVELS:
            rows += per_class_rows(REFERENCE, split, run, level, run["classes"])
    if not rows:
        notes.append("subtype table: the mmnet predictions carry no subtype columns.")
    return pd.DataFrame(rows)


def tidy(table):
    """Round floats to 4 decimals and keep counts as integers."""
    table = table.copy()
    for col in table.columns:
        if col in ("n", "n_patients", "n_folds", "support", "params", "macs", "flops") and table[col].notna().all():
            table[col] = table[col].astype(int)
            continue
        if pd.api.types.is_float_dtype(table[col]):
            table[col] = table[col].round(4)
        elif table[col].dtype == object:
            table[col] = table[col].map(lambda v: round(v, 4) if isinstance(v, float) else v)
    return table


def tuples_per_patient(runs):
    """Median number of test tuples per patient over mmnet's runs (the unit of 'ms per patient')."""
    frames = [level_frame(r["pred"], "tuple", "test") for r in runs.get(REFERENCE, {}).values()]
    frames = [f for f in frames if len(f)]
    if not frames:
        return 1
    return max(1, int(round(pd.concat(frames).groupby("patient_id").size().median())))


def profile_run(name, checkpoint, device, per_patient):
    from utils.efficiency import profile_model
    from utils.trainer import load_model
    model, ckpt = load_model(checkpoint, device)
    n_mags, size = len(ckpt["magnifications"]), ckpt["image_size"]
    stats = profile_model(model, n_mags, size, device)
    patient = profile_model(model, n_mags, size, device, batch=per_patient)
    return dict(model=name, params=int(stats["params"]), params_m=stats["params"] / 1e6, macs=int(stats["macs"]),
                flops=int(stats["flops"]), macs_g=stats["macs"] / 1e9,
                flops_g=stats["flops"] / 1e9, ms_per_tuple=stats["ms_median"], ms_per_patient=patient["ms_median"],
                tuples_per_patient=per_patient, image_size=ckpt["image_size"], device=str(device),
                checkpoint=str(checkpoint))


def efficiency_table(cfg, runs, notes):
    """Params, MACs (thop), FLOPs = 2 x MACs and median latency of each run's best checkpoint on this device."""
    from utils.env import resolve_device
    device = resolve_device(cfg.device)
    per_patient = tuples_per_patient(runs)
    rows = []
    for name, splits in runs.items():
        checkpoint = next((r["checkpoint"] for r in splits.values() if r["checkpoint"].exists()), None)
        if checkpoint is None:
            notes.append(f"efficiency: {name} has no checkpoints/best.pth, skipped.")
            continue
        try:
            rows.append(profile_run(name, checkpoint, device, per_patient))
        except Exception as e:
            notes.append(f"efficiency: {name} could not be profiled from {checkpoint} ({type(e).__name__}: {e}).")
    return pd.DataFrame(rows, columns=EFFICIENCY)


CONSOLE = ["model", "split", "level", "threshold_rule", "magnification", "subtype", "smote", "accuracy",
           "balanced_accuracy",
           "f1", "auc", "auc_ci_low", "auc_ci_high", "subtype_macro_f1", "accuracy_mean", "auc_mean", "auc_ci_low",
           "accuracy_drop", "auc_drop", "accuracy_improvement", "auc_improvement", "cmf_weight_mean", "cmf_weight_std",
           "params_m", "macs_g", "flops_g", "ms_per_tuple", "ms_per_patient", "precision", "recall", "support"]


def render(title, table):
    """Log the table's main columns."""
    log(f"\n{title}")
    if table.empty:
        log("  (no rows)")
        return
    cols = list(dict.fromkeys(c for c in CONSOLE if c in table))
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_rows", 200):
        log(table[cols].to_string(index=False))


def write_table(cfg, key, table):
    path = tables_dir(cfg) / TABLE_NAMES[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    table = tidy(table)
    table.to_csv(path, index=False)
    render(f"{TABLE_NAMES[key]} -> {path}", table)
    return table
