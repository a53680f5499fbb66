"""Result tables from scored runs (tables 1, 2 and 5, subtypes): select rows, mean ± std over folds, CIs; format and
write every table (tables 3 and 4 are built in stages/report/compare.py)."""
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from utils.helpers import log, mean_std, tables_dir, write_csv
from utils.scoring import (BINARY, DECISION_RULES, KEY, LEVELS, RULES, SUBTYPE, binary_scores, confidence_intervals,
                           cv_splits, fold_scores, has_rule, in_order, level_frame, pooled_run, scored_frame,
                           subtype_result, subtype_summary)

EFFICIENCY = ["model", "params", "params_m", "macs", "flops", "macs_g", "flops_g", "ms_per_tuple", "ms_per_patient",
              "tuples_per_patient", "image_size", "field", "device", "checkpoint"]


def compared_settings(record):
    """A run's settings that a table's rows are compared on: the command's, less the run's own (run_settings), with
    the backbone its model was built on (the ResNet baseline's differs from the command's --backbone)."""
    own = set(record.get("run_settings") or {})
    settings = {k: v for k, v in (record.get("settings") or {}).items() if k not in own}
    backbone = (record.get("model_kwargs") or {}).get("backbone")
    return settings | ({"backbone": backbone} if backbone else {})


@dataclass
class Book:
    """What the tables read: the loaded runs, the reference run, which runs each table lists, CI settings, the
    threshold rule in force (it leads every table), notes."""
    runs: dict
    reference: str
    listed: dict
    by_mag: dict
    bootstrap: int = 1000
    seed: int = 0
    notes: list = field(default_factory=list)
    rule: str = "val_youden"
    differs: dict = field(default_factory=dict)
    tuned: dict = field(default_factory=dict)

    def cis(self, frame):
        return confidence_intervals(frame, self.bootstrap, self.seed)

    def differing(self, label, shown):
        """A note for each setting that differs between the runs behind one table's rows, `shown` {run: its splits
        in the table} (compared_settings: the run-specific ones the table compares, such as the student's image size,
        aside)."""
        values, studies = {}, set()
        for name, splits in shown.items():
            for split in splits:
                run = self.runs[name][split]
                record = run["record"] or {}
                studies |= {f"tuning study {s['study']}" for s in record.get("sources", []) if "study" in s}
                for key, value in compared_settings(record).items():
                    values.setdefault(key, {}).setdefault(str(value), []).append(f"{name}/{split}")
        texts = [f"{key} " + "; ".join(f"{value} ({', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''})"
                                        for value, runs in seen.items())
                 for key, seen in values.items() if len(seen) > 1]
        self.differs[label], self.tuned[label] = texts, sorted(studies)
        self.notes += [f"{label}: setting {text} differ between its rows" for text in texts]

    def rule_for(self, name, *runs):
        """The rule in force, or val_youden for comparisons where a run lacks it (with a note)."""
        if all(has_rule(splits, self.rule) for splits in runs):
            return self.rule
        self.notes.append(f"{name}: no {self.rule} threshold in every run it compares; val_youden used there.")
        return "val_youden"


def split_rows(book, name, splits, rules):
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
                row.update(binary_scores(frame), **subtype, **book.cis(frame))
                rows.append(row)
                frames.setdefault((level, rule), []).append(frame)
    return rows, frames


def mean_std_rows(book, rows, frames, pooled_subtype):
    """Per level and rule: 'pooled' (all folds' test patients, with CIs), 'mean', 'std' and 'mean ± std' over folds."""
    table = pd.DataFrame(rows)
    numeric = [c for c in BINARY + SUBTYPE if c in table]
    out = []
    for (name, level, rule), group in table.groupby(["model", "level", "threshold_rule"], sort=False):
        mean, std = group[numeric].mean(), group[numeric].std(ddof=1)
        pooled = pd.concat(frames[(level, rule)], ignore_index=True)
        base = dict(model=name, level=level, threshold_rule=rule, n_folds=len(group))
        out.append(dict(base, split="pooled", n_patients=pooled["patient_id"].nunique(), **binary_scores(pooled),
                        **pooled_subtype.get(level, {}), **book.cis(pooled)))
        out.append(dict(base, split="mean", **mean.to_dict()))
        out.append(dict(base, split="std", **std.to_dict()))
        out.append(dict(base, split="mean ± std", **{k: mean_std(mean[k], std[k], 4) for k in numeric}))
    return out


def cv_table(book):
    splits = book.runs.get(book.reference, {})
    folds = {s: splits[s] for s in cv_splits(splits)}
    if not folds:
        book.notes.append(f"table 1: no cross-validation run of {book.reference} (run the 'cv' stage).")
        return pd.DataFrame()
    rows, frames = split_rows(book, book.reference, folds, in_order(book.rule, DECISION_RULES))
    pooled = pooled_run(folds, list(folds))
    pooled_subtype = {level: subtype_summary(pooled, level) for level in LEVELS}
    table = pd.DataFrame(rows + mean_std_rows(book, rows, frames, pooled_subtype))
    table["n_folds"] = table["n_folds"].fillna(1).astype(int)
    book.differing("table 1", {book.reference: list(folds)})
    return table


def fixed_table(book):
    run = book.runs.get(book.reference, {}).get("fixed")
    if run is None:
        book.notes.append(f"table 2: no fixed-split run of {book.reference} (run the 'fixed' stage).")
        return pd.DataFrame()
    rows, _ = split_rows(book, book.reference, {"fixed": run}, in_order(book.rule, RULES))
    name = f"{book.reference}_fixed_ensemble"
    ensemble = book.runs.get(name, {}).get("fixed")
    if ensemble is None:
        book.notes.append("table 2: no ensemble row (it needs every member run; run the 'fixed' stage).")
    else:
        rows += split_rows(book, name, {"fixed": ensemble}, in_order(book.rule, RULES))[0]
    book.differing("table 2", {book.reference: ["fixed"]} | ({name: ["fixed"]} if ensemble is not None else {}))
    return pd.DataFrame(rows)


def weight_frame(book):
    """Reference test tuples (pooled CV folds, else the fixed split) with their CMF and HMA weights."""
    splits = book.runs.get(book.reference, {})
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


def magnification_table(book):
    weights, source = weight_frame(book)
    if weights.empty:
        book.notes.append(f"table 5: no {book.reference} test predictions, CMF importance left out.")
    rows, shown = [], {}
    for mag, names in book.by_mag.items():
        importance = dict(weight_stats(weights, mag, "w"), **weight_stats(weights, mag, "hma"),
                          weights_from=" ".join(source))
        found = False
        for name in names:
            splits = book.runs.get(name)
            if splits is None:
                continue
            found = True
            folds = cv_splits(splits) or list(splits)
            shown[name] = folds
            rule = book.rule_for(name, {s: splits[s] for s in folds})
            for level in LEVELS:
                scores = fold_scores(splits, folds, level, rule)
                row = dict(magnification=mag, model=name, level=level, threshold_rule=rule, folds=" ".join(folds),
                           n_folds=len(folds))
                for m in KEY:
                    row[f"{m}_mean"], row[f"{m}_std"] = scores[m].mean(), scores[m].std(ddof=1)
                rows.append(dict(row, **importance))
        if not found:
            book.notes.append(f"table 5: no {' or '.join(names)} run; only the CMF weight is listed.")
            rows.append(dict(magnification=mag, **importance))
    book.differing("table 5", shown)
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
            rows.append(dict(base, subtype=c, **per_class_scores(m["per_class"][c])))
        macro = {k: float(np.mean([m["per_class"][c][k] for c in present])) if len(present) > 1 else np.nan
                 for k in ("precision", "recall")}
        rows.append(dict(base, subtype="macro avg", **macro, f1=m["macro_f1"], support=m["n"]))
        micro = m["micro_f1"]
        rows.append(dict(base, subtype="micro avg", precision=micro, recall=micro, f1=micro, support=m["n"]))
    return rows


def per_class_scores(scores):
    """One class's precision/recall/F1; recall and F1 n/a (NaN) for a class absent from the rows."""
    if scores["support"] > 0:
        return scores
    return dict(scores, recall=np.nan, f1=np.nan)


def subtype_table(book):
    splits = book.runs.get(book.reference, {})
    if not splits:
        book.notes.append(f"subtype table: no {book.reference} run.")
        return pd.DataFrame()
    rows = []
    folds = cv_splits(splits)
    parts = dict(splits)
    if len(folds) > 1:
        parts["pooled_cv"] = pooled_run(splits, folds)
    for split, run in parts.items():
        for level in LEVELS:
            rows += per_class_rows(book.reference, split, run, level, run["classes"])
    if not rows:
        why = one_class_note(parts) or "the reference predictions carry no subtype predictions"
        book.notes.append(f"subtype table: n/a, {why}.")
    return pd.DataFrame(rows)


def one_class_note(runs):
    """Why subtype metrics are n/a when a run's subtype head has one class, naming the flag; '' otherwise."""
    single = sorted({c for run in runs.values() for c in run["classes"] if len(run["classes"]) == 1})
    if not single:
        return ""
    return (f"the subtype head has one class ({', '.join(single)}): every subtype has fewer images than "
            f"--subtype-min-images; lower it and rerun from the analyze stage for subtype metrics")


INTEGERS = ("n", "n_patients", "n_folds", "support", "params", "macs", "flops", "n_paired", "n_paired_patients",
            "mcnemar_ref_only", "mcnemar_model_only")


def tidy(table):
    """Round floats to 4 decimals and keep counts as integers."""
    table = table.copy()
    for col in table.columns:
        if col in INTEGERS and table[col].notna().all():
            table[col] = table[col].astype(int)
            continue
        if col.endswith("_p"):
            table[col] = table[col].map(lambda v: float(f"{v:.4g}") if isinstance(v, float) else v)
        elif pd.api.types.is_float_dtype(table[col]):
            table[col] = table[col].round(4)
        elif table[col].dtype == object:
            table[col] = table[col].map(lambda v: round(v, 4) if isinstance(v, float) else v)
    return table


CONSOLE = ["model", "split", "level", "threshold_rule", "magnification", "subtype", "smote", "accuracy",
           "balanced_accuracy",
           "f1", "auc", "auc_ci_low", "auc_ci_high", "subtype_macro_f1", "accuracy_mean", "auc_mean", "auc_ci_low",
           "accuracy_drop", "auc_drop", "accuracy_improvement", "auc_improvement", "auc_diff_ci_low",
           "auc_diff_ci_high", "delong_p", "mcnemar_p", "n_paired", "cmf_weight_mean", "cmf_weight_std",
           "params_m", "macs_g", "flops_g", "ms_per_tuple", "ms_per_patient", "precision", "recall", "support"]


def render(title, table):
    """Log the table's main columns."""
    log(f"\n{title}")
    if table.empty:
        log("  (no rows)")
        return
    cols = list(dict.fromkeys(c for c in CONSOLE if c in table))
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_rows", 200):
        log(table[cols].to_string(index=False, na_rep="n/a"))


def write_table(cfg, name, table):
    """Tidy a table, write it as output/tables/<name> and log it; the tidy table."""
    path = tables_dir(cfg) / name
    table = tidy(table)
    write_csv(table, path, index=False, na_rep="n/a")
    render(f"{name} -> {path}", table)
    return table
