"""A model against the reference on the same test units: DeLong and McNemar p-values, the paired bootstrap CI of the
AUC difference."""
import numpy as np
import pandas as pd

from utils.scoring import scored_frame
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
