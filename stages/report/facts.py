"""What the report page says about a run: settings, data, environment, commit, the headline against the PRD targets,
and the files it can link (figures, CSVs, tuning, TensorBoard)."""
from pathlib import Path

import numpy as np
import pandas as pd

from utils.env import commit
from utils.helpers import num, read_json_or_none
from stages.report.paper import RULE_TEXT

TARGETS = [("accuracy", "Accuracy", 0.96, "≥ 0.96 (PRD: 96-98 %)"), ("balanced_accuracy", "Balanced accuracy", None, "—"),
           ("f1", "F1", 0.95, "> 0.95"), ("auc", "AUC", 0.98, "> 0.98")]
SETTINGS = ["backbone", "pretrained", "image_size", "feature_stage", "epochs", "batch_size", "lr", "selection",
            "threshold_rule", "tuples_per_patient", "freeze_backbone", "frozen_epochs", "smote", "tta", "stain_norm",
            "precision", "seed", "n_folds", "bootstrap", "device"]


def read_csv(path):
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return pd.DataFrame()


def dataset_facts(out):
    summary = read_csv(out / "tables" / "dataset_summary.csv")
    if summary.empty or not {"metric", "value"} <= set(summary):
        return {}
    return dict(zip(summary["metric"], summary["value"]))


def split_facts(out):
    """Patients per role of each split file (train / val / test)."""
    rows = []
    for path in sorted((out / "splits").glob("*.csv")):
        frame = read_csv(path)
        if frame.empty or "role" not in frame:
            continue
        counts = frame["role"].value_counts()
        rows.append(dict(split=path.stem, href=f"splits/{path.name}",
                         **{r: int(counts.get(r, 0)) for r in ("train", "val", "test")}))
    return rows


def environment_rows(env):
    """(name, text) rows of the environment; package versions as one line, the lock's hash shortened."""
    rows = []
    for key, value in env.items():
        if value in (None, "", {}):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        rows.append((key, value[:16] if key == "lock_sha256" else value))
    return rows


def run_facts(cfg, out, record):
    """What was run: the data, the splits, and the settings, commit and compute of the reference model's first run
    (`record`; output/config.json, the last command's, where there is none) beside the report's own settings."""
    saved = read_json_or_none(out / "config.json") or {}
    record = record or {}
    settings = {**(record.get("settings") or saved.get("config") or vars(cfg)), **record.get("compute", {}),
                "bootstrap": cfg.bootstrap}
    data = dataset_facts(out)
    return dict(
        data_root=record.get("data_root") or str(Path(cfg.data_root).resolve()),
        synthetic=bool(saved.get("synthetic_data", cfg.synthetic)),
        patients=data.get("total_patients_by_stem", "n/a"), slides=data.get("slide_folders", "n/a"),
        images=data.get("total_images", "n/a"), magnifications=", ".join(settings.get("magnifications", [])),
        splits=split_facts(out), settings=[(k, settings[k]) for k in SETTINGS if k in settings],
        environment=environment_rows(saved.get("environment") or {}),
        commit=record.get("commit") or commit() or "unknown", tuning=record.get("tuning") or "",
        stage_times=read_csv(out / "logs" / "stage_times.csv").to_dict("records"),
    )


def verdict(value, low, high, target):
    if target is None or not np.isfinite(value):
        return ""
    if np.isfinite(low) and low > target:
        return "above target"
    if np.isfinite(high) and high < target:
        return "below target"
    return "95 % CI spans the target" if np.isfinite(low) else ("above target" if value > target else "below target")


def headline(tables, rule):
    """MMNet's patient-level scores with 95 % CIs (pooled CV folds, else the fixed split) against the PRD targets."""
    cv, fixed = tables["cv"], tables["fixed"]
    rows, source = pd.DataFrame(), ""
    if len(cv):
        rows = cv[(cv["split"] == "pooled") & (cv["level"] == "patient") & (cv["threshold_rule"] == rule)]
        source = "all cross-validation folds' test patients pooled"
    if rows.empty and len(fixed):
        rows = fixed[(fixed["model"] == fixed["model"].iloc[0]) & (fixed["level"] == "patient") &
                     (fixed["threshold_rule"] == rule)]
        source = "the fixed split's test patients"
    if rows.empty:
        return None
    row = rows.iloc[0]
    cards = []
    for key, title, target, shown in TARGETS:
        value, low, high = (float(row.get(c, np.nan)) for c in (key, f"{key}_ci_low", f"{key}_ci_high"))
        cards.append(dict(title=title, value=num(value), ci=f"[{num(low)}, {num(high)}]" if np.isfinite(low) else "",
                          target=shown, verdict=verdict(value, low, high, target)))
    return dict(cards=cards, source=source, n=int(row["n_patients"]), rule=RULE_TEXT.get(rule, rule))


def figure(out, rel, caption):
    path = out / rel
    return dict(src=rel, caption=caption) if path.is_file() else None


def first_figure(out, options, caption):
    """The first of several candidate plots (e.g. pooled_cv, else fold_0) that exists."""
    return next((f for f in (figure(out, rel, caption) for rel in options) if f), None)


def links(out, pattern, parents=0):
    """Files matching pattern, named by the file and its `parents` folders."""
    return [dict(href=str(p.relative_to(out)), name="/".join(p.parts[len(p.parts) - parents - 1:]))
            for p in sorted(out.glob(pattern)) if p.is_file()]


def csv_groups(out):
    """Every CSV under the output folder: tables and splits by name, run files per run and split (the image-level
    protocol's runs apart)."""
    groups = [("Tables", links(out, "tables/*.csv")), ("Splits", links(out, "splits/*.csv")),
              ("Index and logs", links(out, "*.csv") + links(out, "logs/*.csv")),
              ("Grad-CAM / attention listings", links(out, "plots/*/index.csv", 1)),
              ("Predictions of new patients", links(out, "predictions/*/*.csv", 1)),
              ("Tuning", links(out, "tuning/*.csv"))]
    runs = {}
    for pattern, tag in (("runs/*/*/*.csv", ""), ("protocol/runs/*/*/*.csv", " (image-level protocol, table 9)")):
        for path in sorted(out.glob(pattern)):
            runs.setdefault(path.parent.parent.name + tag, []).append(
                dict(href=str(path.relative_to(out)), name=f"{path.parent.name}/{path.stem}"))
    return [(title, items) for title, items in groups if items], runs


def tuning(out):
    folder = out / "tuning"
    if not folder.is_dir():
        return None
    best = folder / "best_config.json"
    return dict(plots=[dict(src=f"tuning/{p.name}", caption=p.stem.replace("_", " "))
                       for p in sorted(folder.glob("*.png"))],
                files=links(out, "tuning/*.csv") + links(out, "tuning/*.json"),
                best=best.read_text()[:4000] if best.is_file() else "")


def tensorboard_runs(out):
    """Runs that wrote TensorBoard event files: run -> splits."""
    found = {}
    for path in sorted(out.glob("tensorboard/*/*/events.out.tfevents.*")):
        found.setdefault(path.parent.parent.name, set()).add(path.parent.name)
    return {run: sorted(splits) for run, splits in found.items()}


def gallery(out):
    """Grad-CAM and spatial attention figures of the explained test tuples, and the categories with none."""
    listing = read_csv(out / "plots" / "gradcam" / "index.csv")
    if listing.empty:
        return None
    items, empty = [], []
    for row in listing.to_dict("records"):
        cam = figure(out, f"plots/{row.get('gradcam')}", "Grad-CAM") if isinstance(row.get("gradcam"), str) else None
        if cam is None:
            empty.append(row.get("note") or f"{row.get('category')}: no figure")
            continue
        attn = row.get("attention_map")
        items.append(dict(category=str(row["category"]).replace("_", " "), patient=row.get("patient_id"),
                          prob=num(float(row.get("prob_malignant", np.nan))), gradcam=cam,
                          attention=figure(out, f"plots/{attn}", "spatial attention") if isinstance(attn, str)
                          else None))
    return dict(items=items, empty=empty)
