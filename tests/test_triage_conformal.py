"""Tables 6 and 7 on synthetic patients: the triage threshold meets its sensitivity where it was fitted, a fold
without benign or malignant validation patients is n/a with the reason, conformal sets keep their coverage."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from config import Config
from stages.report import conformal as C
from stages.report import triage as TR
from utils.checks import check_config
from utils.helpers import PipelineError


def patient_frame(labels, probs, role):
    return pd.DataFrame(dict(level="patient", role=role, patient_id=[f"{role}{i}" for i in range(len(labels))],
                             label=labels, prob_malignant=probs))


def run_of(val_labels, test_labels, seed=0):
    rng = np.random.default_rng(seed)
    probs = lambda y: np.clip(0.3 + 0.4 * np.asarray(y) + rng.normal(0, 0.2, len(y)), 0, 1)  # noqa: E731
    pred = pd.concat([patient_frame(val_labels, probs(val_labels), "val"),
                      patient_frame(test_labels, probs(test_labels), "test")], ignore_index=True)
    return dict(pred=pred)


@pytest.mark.parametrize("target", [1.0, 0.98, 0.9, 0.75])
def test_triage_threshold_reaches_its_sensitivity_on_the_patients_it_was_fitted_on(target):
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        p = np.round(rng.random(40) * 0.6 + 0.3 * y, 2)
        thr = TR.sensitivity_threshold(y, p, target)
        assert (p[y == 1] >= thr).mean() >= target - 1e-12
        above = np.unique(p[p > thr])
        if len(above):
            assert (p[y == 1] >= above[0]).mean() < target, "the highest threshold that meets the target"


def test_fold_with_only_malignant_validation_patients_is_na_with_the_reason():
    splits = {"fold_0": run_of([1, 1, 1, 1], [0, 1, 0, 1, 1]), "fold_1": run_of([0, 1, 0, 1, 1], [0, 1, 1, 0], 1),
              "fold_2": run_of([0, 0, 0], [1, 0, 1], 2)}
    rows = pd.DataFrame(TR.model_rows("m", splits, 1.0, 20, 0)).set_index("split")
    assert rows.loc["fold_0", "note"] == "n/a: no benign validation patient"
    assert rows.loc["fold_2", "note"] == "n/a: no malignant validation patient"
    assert np.isnan(rows.loc["fold_0", "threshold"]) and np.isfinite(rows.loc["fold_1", "threshold"])
    pooled = rows.loc["pooled_cv"]
    assert pooled["folds"] == "fold_1" and pooled["n_patients"] == 4 and "fold_0 (no benign" in pooled["note"]
    assert pooled["missed_cancers"] == round((1 - pooled["sensitivity"]) * pooled["n_malignant"])


def test_triage_shares_count_cleared_patients():
    frame = pd.DataFrame(dict(patient_id=list("abcdef"), label=[0, 0, 0, 1, 1, 1],
                              prob_malignant=[0.1, 0.2, 0.7, 0.3, 0.8, 0.9], thr=0.5))
    row = TR.outcome(frame, 0, 0)
    assert row["missed_cancers"] == 1 and row["n_cleared"] == 3
    assert row["sensitivity"] == pytest.approx(2 / 3) and row["cleared"] == pytest.approx(0.5)
    assert row["benign_cleared"] == pytest.approx(2 / 3) and row["npv"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("alpha", [0.05, 0.10])
@pytest.mark.parametrize("n_cal, malignant, method", [(199, 0.5, "mondrian"), (29, 0.9, "marginal")])
def test_conformal_coverage_on_exchangeable_scores_stays_in_the_binomial_band(alpha, n_cal, malignant, method):
    rng = np.random.default_rng(7)
    trials, covered, smallest = 400, 0, n_cal
    for _ in range(trials):
        y = (rng.random(n_cal + 1) < malignant).astype(int)
        p = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1.5, n_cal + 1))))
        sets, used = C.prediction_sets(y[:n_cal], p[:n_cal], p[n_cal:], alpha)
        assert used == method
        smallest = min(smallest, n_cal if method == "marginal" else min(np.bincount(y[:n_cal], minlength=2)))
        covered += sets[0, y[n_cal]]
    low = binom.ppf(0.001, trials, 1 - alpha)
    high = binom.ppf(0.999, trials, 1 - alpha + 1 / (smallest + 1))
    assert low <= covered <= high, (covered, low, high)


def test_conformal_sets_fall_back_to_one_pool_with_few_calibration_patients():
    y = np.array([0] * 5 + [1] * 30)
    p = np.where(y == 1, 0.9, 0.1)
    sets, method = C.prediction_sets(y, p, np.array([0.05, 0.95]), 0.10)
    assert method == "marginal"
    assert C.mondrian_allowed(np.array([0] * 10 + [1] * 10), 0.10)
    tiny, _ = C.prediction_sets(y[:8], p[:8], np.array([0.05, 0.95]), 0.05)
    assert (tiny == 1).all(), "with 8 calibration patients no label can be left out at alpha 0.05"


def test_temperature_scaling_lowers_the_ece_of_overconfident_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    z = (2 * y - 1) * 0.8 + rng.normal(0, 1, 400)
    p = 1 / (1 + np.exp(-4 * z))
    t = C.fit_temperature(y[:200], p[:200])
    assert t > 1.5
    from utils.metrics import expected_calibration_error as ece
    assert ece(y[200:], C.scaled(p[200:], t)) < ece(y[200:], p[200:])


@pytest.mark.parametrize("alphas", [(0.0,), (1.0,), (0.05, 1.5), (-0.1,)])
def test_alpha_outside_zero_one_is_a_clear_error(alphas):
    with pytest.raises(PipelineError, match="conformal-alpha"):
        C.check_alphas(alphas)
    with pytest.raises(PipelineError, match="conformal-alpha"):
        check_config(replace(Config(), conformal_alpha=alphas))
