"""Tables 3 and 4: each model against the reference on the same test patients, with DeLong and McNemar p-values and
the paired bootstrap CI of the AUC difference."""
import numpy as np
import pandas as pd

from utils.scoring import KEY, LEVELS, binary_scores, cv_splits, fold_scores, scored_frame, shared_splits
from utils.stats import delong, mcnemar, paired_auc_gain

SIGNIFICANCE = ["n_paired", "n_paired_patients", "auc_diff", "auc_diff_ci_low", "auc_diff_ci_high", "delong_auc_diff",
                "delong_p", "mcnemar_ref_only", "mcnemar_model_only", "mcnemar_p"]


def paired_frame(reference, run, level, rule):
    """Test rows of both runs on the same units (patients, or tuples), reference columns suffixed _ref."""
    keys = ["patient_id"] if level == "patient" else ["patient_id", "tuple_id"]
    cols = keys + ["label", "prob_malignant", "thr"]
    ref = scored_frame(reference, level, rule)[cols]
    own = scored_frame(run, level, rule)[cols]
    both = ref.merge(own, on=keys, suffixes=("_ref", ""))
    return both[both["label_ref"] == both["label"]]


def significance(reference, splits, shared, level, rule, n_boot, seed):
    """Reference minus model over the shared splits: DeLong on the pooled units, the fold-mean AUC difference with
    its paired bootstrap CI (a patient's tuples resampled together) and McNemar at the rule's thresholds."""
    frames = {s: paired_frame(reference[s], splits[s], level, rule) for s in shared}
    frames = {s: f for s, f in frames.items() if len(f)}
    if not frames:
        return {c: np.nan for c in SIGNIFICANCE}
    pooled = pd.concat(frames.values(), ignore_index=True)
    y = pooled["label"].to_numpy().astype(int)
    ref_p, own_p = pooled["prob_malignant_ref"].to_numpy(float), pooled["prob_malignant"].to_numpy(float)
    test = delong(y, ref_p, own_p)
    decisions = mcnemar(y, ref_p >= pooled["thr_ref"].to_numpy(float), own_p >= pooled["thr"].to_numpy(float))
    fold = lambda f, col: (f["label"].to_numpy().astype(int), f[col].to_numpy(float))  # noqa: E731
    ref_folds = {s: fold(f, "prob_malignant_ref") for s, f in frames.items()}
    own_folds = {s: fold(f, "prob_malignant") for s, f in frames.items()}
    groups = None if level == "patient" else {s: f["patient_id"].to_numpy() for s, f in frames.items()}
    gain, low, high = paired_auc_gain(ref_folds, own_folds, n_boot, seed, groups)
    return dict(n_paired=len(pooled), n_paired_patients=pooled["patient_id"].nunique(), auc_diff=gain,
                auc_diff_ci_low=low, auc_diff_ci_high=high, delong_auc_diff=test["diff"], delong_p=test["p"],
                mcnemar_ref_only=decisions["a_only"], mcnemar_model_only=decisions["b_only"],
                mcnemar_p=decisions["p"])


def reads(splits):
    """The magnifications a run's model reads, from the record of its first split."""
    return tuple(next(iter(splits.values()))["record"]["reads"])


def comparison_rows(book, name, splits, diff, protocol):
    """Mean ± std over the splits shared with the reference (its CV folds, or the fixed split), pooled CIs and the
    reference minus this model; tuple-level tests only between models that read the same images."""
    reference = book.runs[book.reference]
    shared = ["fixed"] if protocol == "fixed" else shared_splits(splits, reference)
    rule = book.rule_for(name, {s: splits[s] for s in shared}, {s: reference[s] for s in shared})
    rows = []
    for level in LEVELS:
        own = fold_scores(splits, shared, level, rule)
        ref = fold_scores(reference, shared, level, rule)
        pooled = pd.concat([scored_frame(splits[s], level, rule) for s in shared], ignore_index=True)
        row = dict(model=name, protocol=protocol, level=level, threshold_rule=rule, folds=" ".join(shared),
                   n_folds=len(shared), n_patients=pooled["patient_id"].nunique())
        for m in KEY + ["precision", "recall", "specificity"]:
            row[f"{m}_mean"], row[f"{m}_std"] = own[m].mean(), own[m].std(ddof=1)
        scores = binary_scores(pooled)
        row.update({f"{m}_pooled": scores[m] for m in KEY})
        row.update(book.cis(pooled))
        for m in KEY:
            row[f"{m}_{diff}"] = ref[m].mean() - own[m].mean()
        paired = name != book.reference and (level == "patient" or reads(splits) == reads(reference))
        row.update(significance(reference, splits, shared, level, rule, book.bootstrap, book.seed) if paired else
                   {c: np.nan for c in SIGNIFICANCE})
        rows.append(row)
    return rows


def comparison_table(book, table, diff, label):
    """The reference and each listed model on the same test patients: on the CV folds they share, and apart (its own
    rows, beside the reference on the fixed split) the models run on the fixed split only."""
    reference = book.runs.get(book.reference)
    if reference is None:
        book.notes.append(f"{label}: no {book.reference} run to compare against (run the 'cv' stage).")
        return pd.DataFrame()
    groups = {"cv": [book.reference] if cv_splits(reference) else [], "fixed": []}
    for name in book.listed[table]:
        splits = book.runs.get(name)
        shared = shared_splits(splits, reference) if splits is not None else []
        if not shared:
            why = "has no finished run" if splits is None else f"shares no split with {book.reference}"
            book.notes.append(f"{label}: {name} {why}, skipped.")
            continue
        groups["fixed" if shared == ["fixed"] else "cv"].append(name)
    if groups["fixed"]:
        groups["fixed"].insert(0, book.reference)
    rows = [row for protocol, names in groups.items() for name in names
            for row in comparison_rows(book, name, book.runs[name], diff, protocol)]
    shown = {n: list(book.runs[n]) for names in groups.values() for n in names if n != book.reference}
    shown[book.reference] = [s for s in book.runs[book.reference] if s != "fixed" or groups["fixed"]]
    book.differing(label, shown)
    return pd.DataFrame(rows)


def with_efficiency(table, efficiency):
    if table.empty:
        return table
    cols = ["model", "params", "params_m", "macs_g", "flops_g", "ms_per_tuple", "ms_per_patient"]
    return table.merge(efficiency[cols], on="model", how="left")


def ablation_table(book, efficiency):
    return with_efficiency(comparison_table(book, "ablation", "drop", "table 3"), efficiency)


def baseline_table(book, efficiency):
    table = with_efficiency(comparison_table(book, "baseline", "improvement", "table 4"), efficiency)
    if table.empty:
        return table
    table["auc_per_m_params"] = table["auc_mean"] / table["params_m"]
    ref = table.loc[table["model"] == book.reference, "ms_per_patient"]
    table[f"time_vs_{book.reference}"] = table["ms_per_patient"] / ref.iloc[0] if len(ref) else np.nan
    return table
