"""Calibration of the synthetic difficulty with a cheap probe independent of the models: colour and texture
features per image, standardised logistic regression, patient-wise cross-validation, patient AUC per
magnification and fused. `python tests/test_synthetic_difficulty.py --seeds 0 1 2` prints the table."""
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


def test_default_single_magnification_is_informative_but_far_from_perfect():
    auc = demo_probe("default")
    assert 0.72 <= auc["best_single"] <= 0.9, auc
    assert min(auc[m] for m in MAGNIFICATIONS) >= 0.6, auc


def test_default_fusion_beats_the_best_single_magnification():
    auc = demo_probe("default")
    assert auc["fused"] >= auc["best_single"] + 0.05, auc


def test_difficulty_orders_the_probe():
    aucs = {level: demo_probe(level) for level in ("easy", "default", "hard")}
    for key in ("best_single", "fused"):
        assert aucs["easy"][key] > aucs["default"][key] > aucs["hard"][key], {k: v[key] for k, v in aucs.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Probe AUCs of the demo synthetic tree per difficulty and seed.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--difficulty", nargs="+", default=list(DIFFICULTY), choices=list(DIFFICULTY))
    args = parser.parse_args(argv)
    rows = [dict(difficulty=level, seed=seed, **probe(*demo_tree(seed, level)))
            for level in args.difficulty for seed in args.seeds]
    table = pd.DataFrame(rows)
    table["fused_gain"] = table["fused"] - table["best_single"]
    pd.set_option("display.width", 160)
    print(table.round(3).to_string(index=False))
    print(table.drop(columns="seed").groupby("difficulty", sort=False).agg(["mean", "std"]).round(3).to_string())


if __name__ == "__main__":
    main()
