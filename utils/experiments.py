"""Experiment stages: MMNet on the CV folds and the fixed split, baselines and ablations, all scored on the same tuples."""
import shutil
import time
from collections import Counter

import numpy as np
import pandas as pd

from config import to_dict
from preprocess.cache import image_cache
from preprocess.tuples import TrainBatches, TupleImages, eval_batches, eval_tuples, groups
from utils.env import resolve_device, seed_everything
from utils.helpers import PipelineError, log, models_dir, read_json, require, run_dir, split_path, warn, write_json
from utils.losses import Criterion, class_balanced_weights, focal_alpha
from utils.metrics import binary_metrics, patient_level, sensitivity_threshold, subtype_metrics, youden_threshold
from utils.trainer import fit, make_loader, precision, predict, slim_last


def baseline_specs(cfg):
    """(run name, registry name, model flags) of every baseline."""
    specs = [("simple_concat", "simple_concat", {})]
    specs += [(f"single_{m}", "single_mag", {"mag": m}) for m in cfg.magnifications]
    specs += [("resnet50_transfer", "resnet50_transfer", {"mag": cfg.magnifications[0], "backbone": cfg.resnet_backbone})]
    return specs


def ablation_specs(cfg):
    """MMNet without each component, and MMNet on each magnification alone (PRD 5.1)."""
    specs = [(f"mmnet_no_{part}", "mmnet", {f"use_{part}": False}) for part in ("spatial", "channel", "hma", "cmf")]
    return specs + [(f"mmnet_only_{m}", "mmnet", {"use_mags": (m,)}) for m in cfg.magnifications]


def model_kwargs(cfg, model_name, n_classes, flags):
    kwargs = dict(magnifications=tuple(cfg.magnifications), num_subtypes=n_classes, backbone=cfg.backbone,
                  pretrained=cfg.pretrained, pretrained_path=cfg.pretrained_path, drop_rate=cfg.drop_rate)
    if model_name == "mmnet":
        kwargs["shared_backbone"] = cfg.shared_backbone
    if flags.get("backbone", cfg.backbone) != cfg.backbone:
        kwargs["pretrained_path"] = ""
    return dict(kwargs, **flags)


def split_frames(cfg, split_name):
    """The index, and its rows per role ('train', 'val', 'test') of the saved split."""
    from preprocess.analyze import load_index
    from preprocess.preprocess import load_split
    split = load_split(cfg, split_name)
    index = load_index(cfg)
    roles = dict(zip(split["patient_id"].astype(str), split["role"]))
    index = index.assign(patient_id=index["patient_id"].astype(str))
    role = index["patient_id"].map(roles)
    if role.isna().any():
        warn(f"{int(role.isna().sum())} images belong to patients missing from split '{split_name}'; left out")
    parts = {r: index[role == r] for r in ("train", "val", "test")}
    empty = [r for r, rows in parts.items() if rows.empty]
    if empty:
        raise PipelineError(f"split '{split_name}' has no {'/'.join(empty)} patients. Rerun the 'split' stage.")
    return index, parts


def make_criterion(cfg, train_groups, classes):
    """Focal alpha and class-balanced subtype weights from the training units (fixed tuples per group)."""
    labels = [g["label"] for g in train_groups]
    counts = Counter(g["subtype_label"] for g in train_groups)
    units = [counts.get(c, 0) * cfg.tuples_per_patient for c in classes]
    return Criterion(focal_alpha(labels), class_balanced_weights(units), cfg.focal_gamma, cfg.subtype_loss_weight)


def prepare_run(cfg, run_name, split_name, model_name, flags):
    """Everything one training run needs: tuples, cache-backed dataset, sampler, criterion, model settings."""
    from preprocess.analyze import subtype_classes
    index, parts = split_frames(cfg, split_name)
    classes = subtype_classes(index)
    mags = tuple(cfg.magnifications)
    _, cache_file, row_of = image_cache(cfg, index["path"].astype(str).tolist())
    sampler = TrainBatches(parts["train"], mags, row_of, classes, cfg.tuples_per_patient, cfg.batch_size, cfg.seed)
    tuples = {role: eval_tuples(rows, mags) for role, rows in parts.items()}
    batches = {role: eval_batches(t, mags, row_of, classes, cfg.batch_size) for role, t in tuples.items()}
    return dict(
        tag=f"{run_name}/{split_name}", run=run_name, split=split_name, folder=run_dir(cfg, run_name, split_name),
        model_name=model_name, model_kwargs=model_kwargs(cfg, model_name, len(classes), flags), classes=classes,
        dataset=TupleImages(cache_file), train_sampler=sampler, tuples=tuples, batches=batches,
        criterion=make_criterion(cfg, groups(parts["train"], mags), classes),
    )


def smote_balance(x, y, seed=0):
    """SMOTE every class with at least 2 samples up to the largest class; k adapted to the smallest of them."""
    from imblearn.over_sampling import SMOTE
    counts = Counter(int(v) for v in y)
    top = max(counts.values())
    grow = {c: top for c, n in counts.items() if 2 <= n < top}
    single = [c for c, n in counts.items() if n < 2 and n < top]
    if single:
        log(f"SMOTE: class(es) {single} have one training tuple; left as they are")
    if not grow:
        return x, np.asarray(y)
    k = min(5, min(counts[c] for c in grow) - 1)
    return SMOTE(sampling_strategy=grow, k_neighbors=k, random_state=seed).fit_resample(x, np.asarray(y))


def refit_head(x, y, seed=0):
    """A fresh subtype head on (balanced) embeddings: standardised logistic regression."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if len(np.unique(y)) < 2:
        return DummyClassifier(strategy="most_frequent").fit(x, y)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)).fit(x, y)


def head_proba(clf, x, n_classes):
    proba = np.zeros((len(x), n_classes))
    proba[:, clf.classes_.astype(int)] = clf.predict_proba(x)
    return proba


def class_index(names, classes):
    return np.array([classes.index(n) if n in classes else -1 for n in names])


def tuple_predictions(run, role, res, cfg, smote_prob):
    """predictions.csv rows of one role at tuple level."""
    t, classes = run["tuples"][role], run["classes"]
    df = t[["patient_id", "group", "tuple_id", "label", "subtype_label"]].copy()
    df.insert(0, "role", role)
    df.insert(0, "level", "tuple")
    df["prob_malignant"] = res["prob"]
    df["subtype_pred"] = [classes[i] for i in res["subtype_prob"].argmax(1)]
    df["subtype_pred_smote"] = [classes[i] for i in smote_prob.argmax(1)] if smote_prob is not None else ""
    if cfg.tta:
        df["prob_malignant_tta"] = res["prob_tta"]
    for j, m in enumerate(cfg.magnifications):
        df[f"path_{m}"] = t[f"path_{m}"].to_numpy()
        df[f"mask_{m}"] = (t[f"path_{m}"] != "").astype(int).to_numpy()
        df[f"w_{m}"] = res["mag_weights"][:, j]
        df[f"hma_{m}"] = res["hma_weights"][:, j]
    return df


def patient_predictions(tuples, res, classes, smote_prob):
    """One row per patient: mean malignant probability and mean subtype probabilities over its tuples."""
    pl = patient_level(tuples)
    at = tuples.groupby("patient_id", sort=True).indices
    pl.insert(0, "role", tuples["role"].iloc[0])
    pl.insert(0, "level", "patient")
    pl["group"] = [" + ".join(sorted(tuples["group"].iloc[at[p]].unique())) for p in pl["patient_id"]]
    pl["tuple_id"] = ""
    pl["subtype_label"] = [tuples["subtype_label"].iloc[at[p]].mode().iloc[0] for p in pl["patient_id"]]
    pl["subtype_pred"] = [classes[res["subtype_prob"][at[p]].mean(0).argmax()] for p in pl["patient_id"]]
    smote = [classes[smote_prob[at[p]].mean(0).argmax()] for p in pl["patient_id"]] if smote_prob is not None else ""
    pl["subtype_pred_smote"] = smote
    if "prob_malignant_tta" in tuples:
        pl["prob_malignant_tta"] = [tuples["prob_malignant_tta"].iloc[at[p]].mean() for p in pl["patient_id"]]
    return pl.drop(columns="n_tuples")


def binary_block(frame, thresholds, column="prob_malignant"):
    y, p = frame["label"].to_numpy(), frame[column].to_numpy()
    return {"t0.5": binary_metrics(y, p, 0.5), "youden": binary_metrics(y, p, thresholds["youden"]),
            "sens95": binary_metrics(y, p, thresholds["sens95"])}


def subtype_block(frame, classes, column):
    return subtype_metrics(class_index(frame["subtype_label"], classes), class_index(frame[column], classes), classes)


def levels(tuples, patients, fn):
    return {"tuple": fn(tuples), "patient": fn(patients)}


def smote_head(cfg, run, res):
    """Refit the subtype head on SMOTE-balanced training embeddings; (probabilities per role, class counts)."""
    classes = run["classes"]
    y = class_index(run["tuples"]["train"]["subtype_label"], classes)
    x = res["train"]["embedding"]
    xb, yb = smote_balance(x, y, cfg.seed)
    clf = refit_head(xb, yb, cfg.seed)
    counts = dict(before={classes[c]: n for c, n in sorted(Counter(y.tolist()).items())},
                  after={classes[c]: n for c, n in sorted(Counter(np.asarray(yb).tolist()).items())})
    probs = {role: head_proba(clf, res[role]["embedding"], len(classes)) for role in ("val", "test")}
    return probs, counts


def evaluate(cfg, model, run, device, state):
    """Score the best model: thresholds from validation, tuple and patient level, SMOTE head, TTA."""
    start = time.time()
    dtype, _ = precision(cfg, device)
    roles = ("train", "val", "test") if cfg.smote else ("val", "test")
    res = {role: predict(model, make_loader(run["dataset"], run["batches"][role], cfg, device, cfg.seed), device,
                         dtype, tta=cfg.tta and role != "train") for role in roles}
    classes = run["classes"]
    smote_probs, counts = smote_head(cfg, run, res) if cfg.smote else ({}, None)
    val_y = run["tuples"]["val"]["label"].to_numpy()
    thresholds = dict(youden=youden_threshold(val_y, res["val"]["prob"]),
                      sens95=sensitivity_threshold(val_y, res["val"]["prob"], 0.95))
    frames, metrics = [], {}
    for role in ("val", "test"):
        t = tuple_predictions(run, role, res[role], cfg, smote_probs.get(role))
        p = patient_predictions(t, res[role], classes, smote_probs.get(role))
        frames += [t, p]
        metrics[role] = levels(t, p, lambda f: binary_block(f, thresholds))
        if cfg.tta:
            metrics[f"{role}_tta"] = levels(t, p, lambda f: binary_block(f, thresholds, "prob_malignant_tta"))
        metrics[f"subtype_{role}"] = levels(t, p, lambda f: subtype_block(f, classes, "subtype_pred"))
        if cfg.smote:
            metrics[f"subtype_smote_{role}"] = levels(t, p, lambda f: subtype_block(f, classes, "subtype_pred_smote"))
    test_tuples = frames[2]
    summary = dict(
        run=run["run"], split=run["split"], seed=cfg.seed, model_name=run["model_name"],
        model_kwargs=run["model_kwargs"], classes=classes, threshold=thresholds,
        test=metrics["test"], val=metrics["val"], subtype=metrics["subtype_test"],
        subtype_smote=metrics.get("subtype_smote_test"), smote=counts,
        mag_weights={m: float(np.nanmean(test_tuples[f"w_{m}"])) for m in cfg.magnifications},
        best_epoch=state["best_epoch"], epochs=len(state["history"]), train_seconds=state["seconds"],
        eval_seconds=time.time() - start,
    )
    if cfg.tta:
        summary["test_tta"] = metrics["test_tta"]
    predictions = pd.concat(frames, ignore_index=True)
    for m in cfg.magnifications:
        predictions[f"mask_{m}"] = predictions[f"mask_{m}"].astype("Int64")
    return predictions, summary


def fold_line(tag, m):
    p, t = m["test"]["patient"], m["test"]["tuple"]
    smote = m["subtype_smote"]["tuple"]["macro_f1"] if m.get("subtype_smote") else float("nan")
    return (f"[{tag}] TEST patient AUC {p['youden']['auc']:.3f} acc {p['youden']['accuracy']:.3f} "
            f"F1 {p['youden']['f1']:.3f} sens {p['youden']['recall']:.3f} spec {p['youden']['specificity']:.3f} "
            f"(t={m['threshold']['youden']:.2f}; acc@0.5 {p['t0.5']['accuracy']:.3f}) | tuple AUC {t['t0.5']['auc']:.3f} "
            f"acc {t['youden']['accuracy']:.3f} | subtype macro-F1 {m['subtype']['tuple']['macro_f1']:.3f} "
            f"(SMOTE {smote:.3f}) | {m['epochs']} epochs, best {m['best_epoch']}, {m['train_seconds']:.0f}s")


def run_one(cfg, run_name, split_name, model_name, flags=None, callback=None):
    """Train, evaluate and write one run folder; a finished run is read back unless cfg.force."""
    from backbones import build_model
    folder = run_dir(cfg, run_name, split_name)
    if (folder / "metrics.json").exists() and not cfg.force:
        log(f"[{run_name}/{split_name}] finished earlier; skipped (--force reruns it)")
        return read_json(folder / "metrics.json")
    seed_everything(cfg.seed)
    run = prepare_run(cfg, run_name, split_name, model_name, dict(flags or {}))
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", dict(run=run_name, split=split_name, model_name=model_name,
                                            model_kwargs=run["model_kwargs"], config=to_dict(cfg)))
    device = resolve_device(cfg.device)
    model = build_model(model_name, **run["model_kwargs"])
    n_train = len(run["train_sampler"].group_list)
    log(f"[{run['tag']}] {model_name} | {n_train} train groups x {cfg.tuples_per_patient} tuples/epoch | "
        f"val {len(run['tuples']['val'])} / test {len(run['tuples']['test'])} tuples | device {device}")
    state = fit(cfg, model, run, device, callback)
    predictions, metrics = evaluate(cfg, model, run, device, state)
    predictions.to_csv(folder / "predictions.csv", index=False)
    write_json(folder / "metrics.json", metrics)
    slim_last(folder)
    log(fold_line(run["tag"], metrics))
    return metrics


def mean_std(values):
    values = np.asarray(values, dtype=float)
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}" if len(values) else "n/a"


def summary_line(run_name, results):
    pick = lambda key, t="youden": [r["test"]["patient"][t][key] for r in results]  # noqa: E731
    return (f"[{run_name}] {len(results)} split(s) | test patient AUC {mean_std(pick('auc'))} | "
            f"acc {mean_std(pick('accuracy'))} | F1 {mean_std(pick('f1'))} | acc@0.5 {mean_std(pick('accuracy', 't0.5'))}")


def checked_cv_names(cfg):
    """CV split names, after checking the 'split' stage has written them."""
    from preprocess.preprocess import cv_split_names
    names = list(cv_split_names(cfg))
    for name in names:
        require(split_path(cfg, name), "split")
    return names


def copy_best(cfg, run_name, split_name, target):
    best = run_dir(cfg, run_name, split_name) / "checkpoints" / "best.pth"
    if not best.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, target)


def run_specs(cfg, specs, names):
    for run_name, model_name, flags in specs:
        results = [run_one(cfg, run_name, name, model_name, flags) for name in names]
        log(summary_line(run_name, results))


def run_cv(cfg):
    """MMNet on every selected cross-validation fold; each fold's best checkpoint goes to output/models/checkpoints."""
    names = checked_cv_names(cfg)
    results = []
    for name in names:
        results.append(run_one(cfg, "mmnet", name, "mmnet"))
        copy_best(cfg, "mmnet", name, models_dir(cfg) / "checkpoints" / f"mmnet_{name}.pth")
    log(summary_line("mmnet", results))


def run_fixed(cfg):
    """MMNet on the fixed 70/15/15 split; its best checkpoint becomes output/models/best_model.pth."""
    require(split_path(cfg, "fixed"), "split")
    metrics = run_one(cfg, "mmnet", "fixed", "mmnet")
    copy_best(cfg, "mmnet", "fixed", models_dir(cfg) / "best_model.pth")
    log(summary_line("mmnet fixed", [metrics]))


def run_baselines(cfg):
    """Simple concatenation, one model per magnification and the ResNet50 transfer baseline, on the CV folds."""
    run_specs(cfg, baseline_specs(cfg), checked_cv_names(cfg))


def run_ablations(cfg):
    """MMNet without spatial / channel / HMA / CMF, and MMNet on one magnification only, on the CV folds."""
    run_specs(cfg, ablation_specs(cfg), checked_cv_names(cfg))
