"""Report stage on fabricated run folders: every table and plot, consistent summaries, CIs, ECE, missing runs."""
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from config import Config
from tests.conftest import model_settings
from utils import plottings as P
from utils import scoring as S
from stages.report import registry as T
from utils.helpers import PipelineError, run_dir
from stages.report.report import run_report

MAGS = ("40X", "100X", "200X", "400X")
CLASSES = ["ductal_carcinoma", "fibroadenoma", "Other"]
SUBTYPES = {0: ["fibroadenoma", "Other"], 1: ["ductal_carcinoma", "Other"]}
FOLDS = [f"fold_{k}" for k in range(5)]
RUNS = {
    "mmnet": FOLDS + ["fixed"], "mmnet_no_spatial": FOLDS, "mmnet_no_channel": FOLDS, "mmnet_no_hma": FOLDS,
    "mmnet_no_cmf": FOLDS, "mmnet_only_40X": FOLDS[:3], "mmnet_only_100X": FOLDS[:3], "mmnet_only_200X": FOLDS[:3],
    "simple_concat": FOLDS[:3], "single_40X": FOLDS[:3], "single_100X": FOLDS[:3], "single_200X": FOLDS[:3],
    "single_400X": FOLDS[:3], "resnet50_transfer_40X": FOLDS[:2],
}
SKILL = {"mmnet": 2.0, "simple_concat": 1.2, "resnet50_transfer_40X": 0.8}
PROFILED = {"mmnet": ("mmnet", {}), "single_40X": ("single_mag", {"magnifications": ("40X",)})}



def patients(n=30):
    rng = np.random.default_rng(1)
    labels = (np.arange(n) % 3 != 0).astype(int)
    return [(f"P{i:02d}", int(y), SUBTYPES[int(y)][int(rng.random() < 0.3)]) for i, y in enumerate(labels)]


def roles(split, people):
    if split == "fixed":
        return {pid: "test" if i < 8 else "val" if i < 14 else "train" for i, (pid, _, _) in enumerate(people)}
    k = int(split.split("_")[1])
    return {pid: "test" if i % 5 == k else "val" if i % 5 == (k + 1) % 5 else "train"
            for i, (pid, _, _) in enumerate(people)}


def tuple_row(rng, pid, label, subtype, role, t, skill, name):
    logit = skill * (2 * label - 1) + rng.normal(0, 1.2)
    mask = np.ones(4, dtype=int)
    if pid == "P04":
        mask[3] = 0
    score = np.array([0.2, 0.6, 0.4, 0.1]) + (0.3 if label else 0) * np.array([0, 0, 1, 1]) + rng.normal(0, 0.2, 4)
    w = np.exp(score) * mask
    hma = np.exp(rng.normal(0, 0.3, 4)) * mask
    right = rng.random() < 0.7
    row = dict(level="tuple", role=role, patient_id=pid, group=f"{pid}_{subtype}", tuple_id=f"{pid}#{t}", label=label,
               prob_malignant=1 / (1 + np.exp(-logit)), subtype_label=subtype,
               subtype_pred=subtype if right else CLASSES[rng.integers(len(CLASSES))],
               subtype_pred_smote=subtype if rng.random() < 0.75 else CLASSES[rng.integers(len(CLASSES))])
    for j, m in enumerate(MAGS):
        row.update({f"path_{m}": f"/data/{pid}_{m}_{t}.png" if mask[j] else "", f"mask_{m}": mask[j],
                    f"w_{m}": w[j] / w.sum(), f"hma_{m}": np.nan if name == "mmnet_no_hma" else hma[j] / hma.sum()})
    return row


def predictions(name, split, seed):
    rng = np.random.default_rng(seed)
    people, role_of = patients(), roles(split, patients())
    skill = SKILL.get(name, 1.5)
    rows = []
    for pid, label, subtype in people:
        if role_of[pid] == "train":
            continue
        count = int(rng.integers(2, 5))
        tuples = [tuple_row(rng, pid, label, subtype, role_of[pid], t, skill, name) for t in range(count)]
        frame = pd.DataFrame(tuples)
        patient = dict(level="patient", role=role_of[pid], patient_id=pid, group=tuples[0]["group"], tuple_id="",
                       label=label, prob_malignant=frame["prob_malignant"].mean(), subtype_label=subtype,
                       subtype_pred=frame["subtype_pred"].mode().iloc[0],
                       subtype_pred_smote=frame["subtype_pred_smote"].mode().iloc[0])
        rows += tuples + [patient]
    return pd.DataFrame(rows)


def history(seed, epochs=5):
    rng = np.random.default_rng(seed)
    e = np.arange(1, epochs + 1)
    return pd.DataFrame(dict(
        epoch=e, train_loss=1 / e + rng.random(epochs) * 0.05, train_acc=0.6 + 0.07 * e, val_loss=1.1 / e + 0.1,
        val_acc=0.55 + 0.06 * e, val_bal_acc=0.5 + 0.06 * e, val_f1=0.6 + 0.05 * e, val_auc=0.6 + 0.07 * e,
        threshold=0.5, lr=1e-3 * np.cos(e / epochs), seconds=1.0))


def save_checkpoint(folder, run):
    from backbones import build_model
    model_name, flags = PROFILED[run]
    kwargs = model_settings(**dict(dict(magnifications=MAGS, num_subtypes=len(CLASSES)), **flags))
    model = build_model(model_name, **kwargs)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(dict(model=model.state_dict(), model_name=model_name, model_kwargs=kwargs,
                    magnifications=list(model.magnifications), image_size=32, field=[32, 48],
                    classes={"binary": ["benign", "malignant"], "subtype": CLASSES},
                    normalization={"mean": [0.5] * 3, "std": [0.5] * 3}, epoch=1, best_auc=0.9),
               folder / "checkpoints" / "best.pth")


def record(run, split, settings=None):
    """A run's record.json as training writes it: what it reads, its settings, the patients behind it."""
    role_of = roles(split, patients())
    own = {r: sorted(p for p, role in role_of.items() if role == r) for r in ("train", "val")}
    one = run.removeprefix("single_").removeprefix("mmnet_only_").removeprefix("resnet50_transfer_")
    reads = [one] if one in MAGS else list(MAGS)
    return dict(run=run, split=split, reads=reads, digest=f"{run}/{split}", settings=settings or dict(epochs=5),
                run_settings={}, seen_patients=own, sources=[dict(name=f"{run}/{split}", **own)])


def write_run(cfg, run, split, seed):
    """A run folder as training writes it: predictions, history, metrics (thresholds fitted per level) and record."""
    folder = run_dir(cfg, run, split)
    folder.mkdir(parents=True, exist_ok=True)
    pred = predictions(run, split, seed=seed)
    pred.to_csv(folder / "predictions.csv", index=False)
    history(seed).to_csv(folder / "history.csv", index=False)
    val = pred[pred["role"] == "val"]
    thresholds = {level: S.fitted_thresholds(val[val["level"] == level]) for level in S.LEVELS}
    (folder / "metrics.json").write_text(json.dumps(dict(run=run, split=split, seed=0, classes=CLASSES,
                                                         threshold=thresholds)))
    (folder / "record.json").write_text(json.dumps(record(run, split)))
    return folder


def write_robustness(folder, pred, seed):
    """robustness.csv as the robustness stage writes it: the test patients clean, with 40X missing (its weight gone
    to the others) and with 100X blurred (its scores noisier)."""
    rng = np.random.default_rng(seed)
    tuples = pred[(pred["level"] == "tuple") & (pred["role"] == "test")]
    clean = tuples.groupby("patient_id").agg(label=("label", "first"), prob_malignant=("prob_malignant", "mean"),
                                             n_tuples=("tuple_id", "size"),
                                             **{f"w_{m}": (f"w_{m}", "mean") for m in MAGS}).reset_index()
    missing = clean.assign(w_40X=0.0, **{f"w_{m}": clean[f"w_{m}"] / (1 - clean["w_40X"]) for m in MAGS[1:]})
    blurred = clean.assign(prob_malignant=np.clip(clean["prob_malignant"] + rng.normal(0, 0.3, len(clean)), 0, 1),
                           w_100X=clean["w_100X"] / 2)
    frames = [f.assign(condition=c, kind=c.partition("_")[0], magnification=c.partition("_")[2])
              for f, c in ((clean, "clean"), (missing, "missing_40X"), (blurred, "blur_100X"))]
    pd.concat(frames, ignore_index=True).to_csv(folder / "robustness.csv", index=False)


def write_protocol_run(cfg, run, split, seed):
    """A run of the image-level protocol under output/protocol/: its test patients are PATIENT~k, and every one of
    them also trained on its images of the other folds."""
    folder = write_run(replace(cfg, output_dir=str(Path(cfg.output_dir) / "protocol")), run, split, seed)
    k = split.split("_")[1]
    pred = pd.read_csv(folder / "predictions.csv", dtype={"patient_id": str})
    pred.assign(patient_id=pred["patient_id"] + f"~{k}").to_csv(folder / "predictions.csv", index=False)
    rec = json.loads((folder / "record.json").read_text())
    rec["seen_patients"]["train"] = [f"{pid}~{j}" for pid, _, _ in patients() for j in range(5) if str(j) != k]
    (folder / "record.json").write_text(json.dumps(rec))


def fabricate(cfg, with_checkpoints=False):
    for j, split in enumerate(FOLDS[:3]):
        write_protocol_run(cfg, "mmnet", split, 900 + j)
    for i, (run, splits) in enumerate(RUNS.items()):
        for j, split in enumerate(splits):
            folder = write_run(cfg, run, split, 100 * i + j)
            if run in ("mmnet", "simple_concat") and split != "fixed":
                write_robustness(folder, pd.read_csv(folder / "predictions.csv", dtype={"patient_id": str}), j)
            if with_checkpoints and run in PROFILED and j == 0:
                save_checkpoint(folder, run)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "output"
    cfg = replace(Config(), output_dir=str(out), device="cpu", bootstrap=40, magnifications=MAGS)
    fabricate(cfg, with_checkpoints=True)
    run_report(cfg)
    return cfg, out


def table(out, key):
    return pd.read_csv(out / "tables" / T.TABLE_NAMES[key])


def test_every_table_and_plot_is_written(report):
    _, out = report
    for name in T.TABLE_NAMES.values():
        assert len(pd.read_csv(out / "tables" / name)) > 0, name
    plots = out / "plots"
    expected = [
        "confusion_matrices/mmnet_fold_0_binary_tuple.png", "confusion_matrices/mmnet_pooled_cv_binary_patient.png",
        "confusion_matrices/mmnet_pooled_cv_subtype.png", "confusion_matrices/mmnet_pooled_cv_subtype_smote.png",
        "confusion_matrices/mmnet_fixed_subtype.png", "roc_curves/mmnet_cv_tuple.png", "roc_curves/mmnet_cv_patient.png",
        "roc_curves/mmnet_fixed_patient.png", "roc_curves/mmnet_vs_ablations_patient.png",
        "roc_curves/mmnet_vs_baselines_tuple.png",
        "training_curves/mmnet.png", "training_curves/single_400X.png",
        "calibration/mmnet_pooled_cv_reliability_tuple.png",
        "calibration/mmnet_fixed_confidence_patient.png", "magnification_importance/mmnet_pooled_cv.png",
        "robustness/auc_change.png",
    ]
    for rel in expected:
        assert (plots / rel).stat().st_size > 5000, rel
    for fold in FOLDS:
        assert (plots / "confusion_matrices" / f"mmnet_{fold}_binary_patient.png").exists()


def test_registry_builds_each_table_as_its_builder_does(report):
    from stages.report.compare import ablation_table, baseline_table
    from stages.report.report import book_of
    cfg, out = report
    efficiency = table(out, "efficiency")
    direct = dict(cv=T.cv_table, fixed=T.fixed_table, magnification=T.magnification_table, subtype=T.subtype_table,
                  ablation=lambda b: ablation_table(b, efficiency), baseline=lambda b: baseline_table(b, efficiency))
    built = T.build_tables(cfg, book_of(cfg, S.load_runs(Path(cfg.output_dir) / "runs")), efficiency)
    assert set(built) == set(T.TABLE_NAMES) and built["efficiency"] is efficiency
    for key, build in direct.items():
        expected = build(book_of(cfg, S.load_runs(Path(cfg.output_dir) / "runs")))
        pd.testing.assert_frame_equal(built[key], expected, obj=key)
    for key in ("cv", "magnification"):
        written = table(out, key)
        assert list(written.columns) == list(built[key].columns) and len(written) == len(built[key]), key
    assert len(set(T.TABLE_NAMES.values())) == len(T.TABLE_NAMES)
    assert {T.paper_key(t) for t in T.TABLES if t.paper} == {"table_1", "table_2", "table_3", "table_4", "table_4b",
                                                               "table_5", "table_6", "table_7", "table_8", "table_9"}


def test_protocol_table_sets_the_image_level_split_beside_the_patient_wise_one(report):
    _, out = report
    t9 = table(out, "protocol")
    assert set(t9["model"]) == {"mmnet"} and set(t9["protocol"]) == {"image_level", "patient_wise"}
    image = t9[(t9["protocol"] == "image_level") & (t9["level"] == "patient")].iloc[0]
    patient = t9[(t9["protocol"] == "patient_wise") & (t9["level"] == "patient")].iloc[0]
    assert image["n_folds"] == 3 and patient["n_folds"] == 5
    assert image["also_trained_per_fold"] == image["test_patients_per_fold"] == 6
    assert patient["also_trained_per_fold"] == 0
    assert image["auc_inflation"] == pytest.approx(image["auc_mean"] - patient["auc_mean"], abs=1e-3)
    assert image["auc_inflation_ci_low"] <= image["auc_inflation"] <= image["auc_inflation_ci_high"]
    assert not (out / "runs" / "mmnet" / "fold_0" / "robustness.csv").read_text().count("~")


def test_a_run_of_the_image_level_protocol_is_refused_outside_table_9(tmp_path):
    cfg = replace(Config(), output_dir=str(tmp_path / "output"))
    write_run(cfg, "mmnet", "fold_0", 1)
    write_protocol_run(cfg, "mmnet", "fold_1", 2)
    moved = Path(cfg.output_dir) / "runs" / "mmnet" / "fold_1"
    (Path(cfg.output_dir) / "protocol" / "runs" / "mmnet" / "fold_1").rename(moved)
    with pytest.raises(PipelineError, match="image-level protocol.*table 9"):
        S.load_runs(Path(cfg.output_dir) / "runs")


def test_cv_table_columns_and_no_gaps(report):
    _, out = report
    t1 = table(out, "cv")
    for col in S.BINARY + S.SUBTYPE + ["model", "split", "level", "threshold_rule", "auc_ci_low", "auc_ci_high"]:
        assert col in t1, col
    folds = t1[t1["split"].str.startswith("fold_")]
    assert sorted(folds["split"].unique()) == FOLDS
    assert set(folds["threshold_rule"]) == {"fixed_0.5", "val_youden"}
    assert set(folds["level"]) == {"tuple", "patient"}
    values = folds[S.BINARY + S.SUBTYPE + [f"{m}_ci_low" for m in S.KEY]]
    assert values.notna().all().all()
    assert (values.astype(float).round(4) == values.astype(float)).all().all()


def test_mean_std_rows_agree_with_folds(report):
    _, out = report
    t1 = table(out, "cv")
    for (level, rule), group in t1.groupby(["level", "threshold_rule"]):
        folds = group[group["split"].str.startswith("fold_")]
        mean = group[group["split"] == "mean"].iloc[0]
        std = group[group["split"] == "std"].iloc[0]
        text = group[group["split"] == "mean ± std"].iloc[0]
        for m in S.BINARY + S.SUBTYPE:
            per_fold = folds[m].astype(float)
            assert float(mean[m]) == pytest.approx(per_fold.mean(), abs=2e-4), (level, rule, m)
            assert float(std[m]) == pytest.approx(per_fold.std(ddof=1), abs=2e-4), (level, rule, m)
            shown_mean, shown_std = (float(v) for v in str(text[m]).split(" ± "))
            assert shown_mean == pytest.approx(float(mean[m]), abs=1e-4)
            assert shown_std == pytest.approx(float(std[m]), abs=1e-4)


def test_bootstrap_ci_contains_the_point_estimate(report):
    _, out = report
    rows = pd.concat([table(out, "cv"), table(out, "fixed")])
    rows = rows[rows["auc_ci_low"].notna()]
    assert len(rows) > 20
    for m in S.KEY:
        value, low, high = (rows[c].astype(float) for c in (m, f"{m}_ci_low", f"{m}_ci_high"))
        assert (low <= value + 1e-4).all() and (value <= high + 1e-4).all(), m
        assert (low < high).any(), m
    comparison = table(out, "ablation")
    assert (comparison["auc_ci_low"] <= comparison["auc_pooled"] + 1e-4).all()
    assert (comparison["auc_pooled"] <= comparison["auc_ci_high"] + 1e-4).all()


def test_each_level_is_decided_at_the_threshold_fitted_on_that_level(report):
    cfg, out = report
    from utils.metrics import youden_threshold
    run = S.load_run(run_dir(cfg, "mmnet", "fixed"))
    t2 = table(out, "fixed")
    fitted = {}
    for level in S.LEVELS:
        val = run["pred"][(run["pred"]["level"] == level) & (run["pred"]["role"] == "val")]
        fitted[level] = youden_threshold(val["label"], val["prob_malignant"])
        row = t2[(t2["level"] == level) & (t2["threshold_rule"] == "val_youden")].iloc[0]
        assert row["threshold"] == pytest.approx(fitted[level], abs=1e-4)
    assert fitted["tuple"] != pytest.approx(fitted["patient"], abs=1e-3)
    assert set(t2["threshold_rule"]) == {"fixed_0.5", "val_youden", "val_sens95"}


def test_comparison_tables_use_shared_folds(report):
    _, out = report
    t3, t4 = table(out, "ablation"), table(out, "baseline")
    assert {"mmnet_no_spatial", "mmnet_no_cmf", "mmnet_only_40X", "simple_concat"} <= set(t3["model"])
    for col in ("accuracy_drop", "auc_drop", "params", "macs_g", "flops_g", "ms_per_patient"):
        assert col in t3, col
    concat = t4[(t4["model"] == "simple_concat") & (t4["level"] == "patient")].iloc[0]
    assert concat["folds"] == "fold_0 fold_1 fold_2"
    t1 = table(out, "cv")
    chosen = t1["split"].isin(FOLDS[:3]) & (t1["level"] == "patient") & (t1["threshold_rule"] == "val_youden")
    fold_auc = t1.loc[chosen, "auc"].astype(float)
    assert concat["auc_improvement"] == pytest.approx(fold_auc.mean() - concat["auc_mean"], abs=1e-3)
    profiled = t4.set_index("model").loc[list(PROFILED)]
    assert np.allclose(profiled["flops_g"], 2 * profiled["macs_g"], atol=2e-4)
    assert profiled[["params", "ms_per_tuple", "ms_per_patient", "auc_per_m_params"]].notna().all().all()
    eff = table(out, "efficiency")
    assert (eff["flops"] == 2 * eff["macs"]).all() and (eff["macs"] > 0).all()
    assert set(eff["field"]) == {"48x32"}
    assert t4.loc[t4["model"] == "single_100X", "params"].isna().all()


def test_magnification_and_subtype_tables(report):
    _, out = report
    t5 = table(out, "magnification")
    assert list(dict.fromkeys(t5["magnification"])) == list(MAGS)
    assert t5["cmf_weight_mean"].notna().all() and t5["cmf_weight_std"].notna().all()
    assert t5["cmf_weight_mean"].drop_duplicates().between(0, 1).all()
    sub = table(out, "subtype")
    assert set(sub["smote"]) == {"no", "yes"}
    assert set(CLASSES) <= set(sub["subtype"])
    assert {"fold_0", "pooled_cv", "fixed"} <= set(sub["split"])
    eff = table(out, "efficiency")
    assert set(eff["model"]) == set(PROFILED)


def test_missing_runs_are_noted_not_fatal(report):
    _, out = report
    notes = (out / "tables" / "report_notes.txt").read_text()
    assert "mmnet_only_400X" in notes
    assert "no checkpoints" in notes


def test_report_with_no_runs_says_which_stages(tmp_path):
    cfg = replace(Config(), output_dir=str(tmp_path / "output"))
    with pytest.raises(PipelineError, match="--stages cv,fixed"):
        run_report(cfg)


def test_report_with_fixed_run_only(tmp_path):
    cfg = replace(Config(), output_dir=str(tmp_path / "output"), bootstrap=20, device="cpu")
    write_run(cfg, "mmnet", "fixed", 3)
    run_report(cfg)
    assert len(pd.read_csv(tmp_path / "output" / "tables" / T.TABLE_NAMES["fixed"])) == 6
    assert "table 1" in (tmp_path / "output" / "tables" / "report_notes.txt").read_text()


def direct_ece(y, p, n_bins):
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for b in range(n_bins):
        upper = p <= edges[b + 1] if b == n_bins - 1 else p < edges[b + 1]
        inside = (p >= edges[b]) & upper
        if inside.any():
            total += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
    return total


def test_reliability_diagram_ece_matches_direct_computation(tmp_path):
    y = np.array([0, 0, 1, 0, 1, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.12, 0.18, 0.33, 0.47, 0.52, 0.71, 0.74, 0.93, 1.0])
    P.setup_style()
    ece = P.reliability(y, p, "fixed arrays", tmp_path / "rel.png", n_bins=5)
    assert ece == pytest.approx(direct_ece(y.astype(float), p, 5), abs=1e-12)
    assert ece > 0
    assert (tmp_path / "rel.png").stat().st_size > 5000


def test_explain_writes_gradcam_attention_and_importance(make_cfg, monkeypatch):
    import stages.training.evaluate as evaluate
    from backbones import build_model
    from preprocess.analyze import load_index, run_analyze, subtype_classes
    from preprocess.preprocess import run_split
    from utils.helpers import models_dir
    from stages.inference.explain import run_explain
    from preprocess.cache import field_shape
    from stages.training.checkpoint import checkpoint
    cfg = make_cfg(image_size=48, explain_samples=1)
    run_analyze(cfg)
    run_split(cfg)
    classes = subtype_classes(load_index(cfg))
    kwargs = model_settings(magnifications=tuple(cfg.magnifications), num_subtypes=len(classes), backbone=cfg.backbone)
    torch.manual_seed(0)
    model = build_model("mmnet", **kwargs)
    models_dir(cfg).mkdir(parents=True, exist_ok=True)
    index = load_index(cfg)
    meta = SimpleNamespace(model_name="mmnet", model_kwargs=kwargs, classes=classes,
                           bank=SimpleNamespace(shape=field_shape(index["width"], index["height"], cfg.image_size)))
    trained_with = replace(cfg, stain_norm=True, tta=True)
    torch.save(checkpoint(model, meta, trained_with, 1, 0.5), models_dir(cfg) / "best_model.pth")
    views, predict = [], evaluate.predict
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: views.append(k.get("tta")) or predict(*a, **k))
    run_explain(cfg)
    assert list((Path(cfg.output_dir) / "cache").glob("images_*x48_macenko_*.npy")), "the checkpoint's stain setting"
    assert views == [True], "the checkpoint's test-time augmentation, as its thresholds were fitted"
    plots = models_dir(cfg).parent / "plots"
    listing = pd.read_csv(plots / "gradcam" / "index.csv")
    assert set(listing["category"]) == {"benign_correct", "benign_wrong", "malignant_correct", "malignant_wrong"}
    drawn = listing[listing["gradcam"].notna()]
    assert len(drawn) >= 1 and listing.loc[listing["gradcam"].isna(), "note"].str.startswith("no ").all()
    for path in drawn["gradcam"].tolist() + drawn["attention_map"].tolist():
        assert (plots / path).stat().st_size > 5000
    assert (plots / "magnification_importance" / "best_model_fixed_test.png").exists()
