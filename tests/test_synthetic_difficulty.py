"""Calibration of the synthetic difficulty. Two references independent of the models: the ideal observer (a patient's
mean latent tumour expression, what a perfect per-field detector would see; no images drawn) and a cheap colour and
texture probe (standardised logistic regression, patient-wise cross-validation). The difficulty itself was set on
MMNet's behaviour (docs/results.md: accuracy on the calibrated synthetic data). `python tests/test_synthetic_difficulty.py
--seeds 0 1 2` prints both tables."""
import argparse
import functools
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import MAGNIFICATIONS  # noqa: E402
from preprocess.synthetic import DIFFICULTY, plan, render  # noqa: E402


def features(img):
    """Colour and texture statistics: channel means and stds, dark and bluish shares, gradient and Laplacian energy."""
    rgb = img.astype(np.float32) / 255
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255
    grad = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    lap = np.abs(cv2.Laplacian(gray, cv2.CV_32F))
    dark, bluish = (gray < 0.5).mean(), (rgb[..., 2] > rgb[..., 0]).mean()
    return np.r_[rgb.mean((0, 1)), rgb.std((0, 1)), dark, bluish, grad.mean(), grad.std(), lap.mean()]


def demo_tree(seed=0, difficulty="default"):
    """The demo preset's plan and the probe features of every image, drawn in memory."""
    files = plan("demo", seed, difficulty=difficulty)
    return files, np.stack([features(render(row, seed)) for row in files.to_dict("records")])


def patient_folds(files, folds, seed):
    """Fold number per image, with every patient on one side (stratified on the patient's class)."""
    label = files.groupby("patient_id")["class_name"].first().eq("malignant")
    fold = pd.Series(0, index=label.index)
    for k, (_, test) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(label, label)):
        fold.iloc[test] = k
    return files["patient_id"].map(fold).to_numpy()


def out_of_fold(files, feats, folds, seed):
    """Out-of-fold malignant probability of every image from a logistic regression per magnification."""
    y = files["class_name"].eq("malignant").to_numpy()
    fold = patient_folds(files, folds, seed)
    prob = np.zeros(len(files))
    for mag in MAGNIFICATIONS:
        at = files["magnification"].eq(mag).to_numpy()
        for k in range(folds):
            model = make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cholesky", max_iter=1000))
            model.fit(feats[at & (fold != k)], y[at & (fold != k)])
            prob[at & (fold == k)] = model.predict_proba(feats[at & (fold == k)])[:, 1]
    return prob


def patient_aucs(files, prob):
    """Patient AUC per magnification (mean probability of its images) and fused (mean over magnifications)."""
    per_mag = files.assign(prob=prob).pivot_table(index="patient_id", columns="magnification", values="prob")
    label = files.groupby("patient_id")["class_name"].first().eq("malignant")
    auc = {m: roc_auc_score(label[per_mag[m].notna()], per_mag[m].dropna()) for m in MAGNIFICATIONS}
    auc["fused"] = roc_auc_score(label[per_mag.index], per_mag.mean(axis=1))
    return auc


def probe(files, feats, folds=5, repeats=5):
    """Patient AUCs averaged over repeated patient-wise cross-validation, with the best single magnification."""
    runs = pd.DataFrame([patient_aucs(files, out_of_fold(files, feats, folds, r)) for r in range(repeats)])
    auc = runs.mean().to_dict()
    auc["best_single"] = max(auc[m] for m in MAGNIFICATIONS)
    return auc


@functools.lru_cache(maxsize=None)
def demo_probe(difficulty):
    """Probe AUCs of the demo tree (seed 0) at one difficulty, computed once per session."""
    return probe(*demo_tree(0, difficulty))


def ideal_observer(files):
    """Patient AUC of the mean latent expression per magnification and over all of them (fused)."""
    label = files.groupby("patient_id")["class_name"].first().eq("malignant")
    per_mag = files.pivot_table(index="patient_id", columns="magnification", values="expression")
    auc = {m: roc_auc_score(label[per_mag[m].notna()], per_mag[m].dropna()) for m in MAGNIFICATIONS}
    auc["fused"] = roc_auc_score(label[per_mag.index], per_mag.mean(axis=1))
    auc["best_single"] = max(auc[m] for m in MAGNIFICATIONS)
    return auc


@functools.lru_cache(maxsize=None)
def full_observer(difficulty, seeds=(0, 1, 2)):
    """Ideal-observer AUCs on the benchmark's tree (the `full` preset's 82 patients, 6 images per magnification)."""
    runs = [ideal_observer(plan("full", s, difficulty=difficulty, counts=None, per_mag=6)) for s in seeds]
    return pd.DataFrame(runs).mean().to_dict()


def test_default_leaves_headroom_even_for_a_perfect_field_detector():
    auc = full_observer("default")
    assert 0.9 <= auc["fused"] <= 0.99, auc
    assert auc["best_single"] <= auc["fused"] - 0.1, auc


def test_difficulty_orders_the_ideal_observer():
    aucs = {level: full_observer(level) for level in ("easy", "default", "hard")}
    assert aucs["easy"]["fused"] == 1.0 and aucs["easy"]["best_single"] == 1.0, aucs["easy"]
    for key in ("best_single", "fused"):
        assert aucs["default"][key] > aucs["hard"][key] + 0.05, {k: v[key] for k, v in aucs.items()}


def test_default_hides_the_cue_from_colour_and_texture():
    assert demo_probe("easy")["fused"] >= 0.98, demo_probe("easy")
    assert demo_probe("default")["best_single"] <= 0.8, demo_probe("default")


def test_difficulty_orders_the_probe():
    aucs = {level: demo_probe(level) for level in ("easy", "default", "hard")}
    for key in ("best_single", "fused"):
        assert aucs["easy"][key] > aucs["default"][key] > aucs["hard"][key], {k: v[key] for k, v in aucs.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Probe AUCs of the demo synthetic tree per difficulty and seed.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--difficulty", nargs="+", default=list(DIFFICULTY), choices=list(DIFFICULTY))
    args = parser.parse_args(argv)
    pd.set_option("display.width", 160)
    for name, measure in (("ideal observer, full preset", lambda seed, level: ideal_observer(
            plan("full", seed, difficulty=level, counts=None, per_mag=6))),
            ("colour/texture probe, demo preset", lambda seed, level: probe(*demo_tree(seed, level)))):
        table = pd.DataFrame([dict(difficulty=level, seed=seed, **measure(seed, level))
                              for level in args.difficulty for seed in args.seeds])
        table["fused_gain"] = table["fused"] - table["best_single"]
        print(f"\n{name}")
        print(table.drop(columns="seed").groupby("difficulty", sort=False).agg(["mean", "std"]).round(3).to_string())


if __name__ == "__main__":
    main()
