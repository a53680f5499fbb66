"""Predict stage: score new patients (folders or image files) with best_model.pth or the CV ensemble."""
import shutil
from pathlib import Path

import torch

from backbones.our.gradcam import attention_maps, gradcam
from preprocess.transforms import prepare
from preprocess.tuples import slot_labels, tuple_rows
from stages.inference.predictor import checkpoint_paths, load_predictor, score_images
from stages.training.forward import amp_settings
from utils import plottings as plots
from utils.env import resolve_device
from utils.helpers import PipelineError, log, output_path, safe_name, warn, write_csv
from utils.metrics import binary_metrics

SHOWN = 20



def overlay_title(row, what):
    truth = f", true {row['true_class']}" if row["true_class"] else ""
    return (f"{what} | patient {row['patient_id']}: P(malignant) = {row['prob_malignant']:.3f}, "
            f"{row['decision']} at threshold {row['threshold']:.2f} ({row['threshold_rule']}){truth}")


def explain_batch(p, x, mask):
    """Grad-CAM and spatial attention (None when a model has none) averaged over the models."""
    cams = torch.stack([gradcam(model, x, mask) for model in p.models]).mean(0)
    maps = [attention_maps(model, x, mask)[0] for model in p.models]
    attn = None if any(a is None for a in maps) else torch.stack(maps).mean(0)
    return cams.cpu().numpy(), None if attn is None else attn.cpu().numpy()


def overlays(p, tuples, patients, bank, folder, device, batch_size):
    """Per patient one Grad-CAM and one attention figure of its first tuple, a panel per magnification."""
    first = tuples.drop_duplicates("patient_id").set_index("patient_id").loc[patients["patient_id"]].reset_index()
    used = [any(j in m.used_mags for m in p.models) for j in range(len(p.mags))]
    shutil.rmtree(folder, ignore_errors=True)
    for start in range(0, len(first), batch_size):
        part = first.iloc[start:start + batch_size]
        images, mask = bank.gather(tuple_rows(part, p.mags, bank.row_of), device)
        x, mask = prepare(images, mask, device, **p.normalization)
        cams, attn = explain_batch(p, x, mask)
        images, mask = images.cpu().numpy(), mask.cpu().tolist()
        for i, row in enumerate(patients.iloc[start:start + batch_size].to_dict("records")):
            stem = safe_name(row["patient_id"])
            captions = [f"weight {row[f'weight_{m}']:.2f}" if mask[i][j] else ""
                        for j, m in enumerate(slot_labels(p.mags))]
            plots.overlay_panels(images[i], cams[i], mask[i], used, slot_labels(p.mags), overlay_title(row, "Grad-CAM"),
                                 folder / f"{stem}_gradcam.png", "Grad-CAM (scaled per image)", captions)
            if attn is not None:
                plots.overlay_panels(images[i], attn[i], mask[i], used, slot_labels(p.mags),
                                     overlay_title(row, "Spatial attention"),
                                     folder / f"{stem}_attention.png", "attention (scaled per image)", captions)


def run_name(cfg):
    first = Path(cfg.input[0]).resolve()
    name = safe_name(first.stem if first.is_file() else first.name) or "input"
    more = f"_and_{len(cfg.input) - 1}_more" if len(cfg.input) > 1 else ""
    model = "ensemble" if cfg.ensemble else safe_name(Path(cfg.checkpoint or "best_model.pth").stem)
    return f"{name}{more}_{model}"


def summary(p, patients, n_images, folder):
    """The console lines: what was scored, the first patients, accuracy where names carry labels."""
    trained = "; ".join(f"{r['run']}/{r['split']} (settings digest {r['digest']}, commit {r['commit']})" for r in p.runs)
    log(f"Scored {len(patients)} patient(s) from {n_images} image(s) with {p.source}, trained as {trained} "
        f"(decision threshold {p.threshold['decision']:.3f}, {p.rule}; high sensitivity {p.threshold['sens95']:.3f}, "
        f"from validation)")
    columns = ["patient_id", *[f"n_{m}" for m in p.reads], "prob_malignant", "decision", "decision_high_sensitivity",
               "subtype", "subtype_prob", "true_class"]
    log(patients[columns].head(SHOWN).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if len(patients) > SHOWN:
        log(f"... {len(patients) - SHOWN} more in patients.csv")
    known = patients[patients["true_class"] != ""]
    if len(known):
        m = binary_metrics(known["true_class"].eq("malignant"), known["prob_malignant"], p.threshold["decision"])
        log(f"File names carry labels for {len(known)} patient(s): accuracy {m['accuracy']:.3f}, sensitivity "
            f"{m['recall']:.3f}, specificity {m['specificity']:.3f}, AUC {m['auc']:.3f} at the decision threshold")
    log(f"-> {folder}: patients.csv, images.csv, overlays/")


def problem_text(problems):
    listed = "; ".join(f"{path}: {why}" for path, why in problems[:5])
    return listed + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")


def run_predict(cfg):
    """Stage: malignant probability, decisions, subtype and overlays for every patient in --input."""
    if not cfg.input:
        raise PipelineError("the predict stage needs --input PATH: a folder of images (any layout analyze accepts, "
                            "or flat) or image files, comma-separated. Example: python main.py --input new_patients/")
    device = resolve_device(cfg.device)
    p = load_predictor(checkpoint_paths(cfg.output_dir, cfg.checkpoint, cfg.ensemble), device)
    dtype, _ = amp_settings(cfg, device)
    scored = score_images(p, cfg.input, cfg.batch_size, device, dtype)
    problems, frame = scored.problems, scored.frame
    for path, why in problems:
        warn(f"{path}: {why}; not scored")
    for path, why in scored.left_out:
        warn(f"{path}: {why}; left out")
    if frame.empty:
        raise PipelineError(f"nothing to score in {', '.join(cfg.input)}: {problem_text(problems + scored.left_out)}. "
                            f"Give image files or folders of them (.png as in BreakHis).")
    own = frame[frame["label"] < 0]
    if len(own):
        warn(f"{len(own)} file(s) without a BreakHis name (e.g. {own['file'].iloc[0]}) are each their own patient, "
             f"at the magnification of their folder or else {p.reads[0]} (see the note column of images.csv)")
    folder = output_path(cfg, "predictions", run_name(cfg))
    write_csv(scored.patients, folder / "patients.csv", index=False)
    write_csv(scored.images, folder / "images.csv", index=False)
    plots.setup_style()
    overlays(p, scored.tuples, scored.patients, scored.bank, folder / "overlays", device, cfg.batch_size)
    summary(p, scored.patients, len(frame), folder)
    if problems:
        raise PipelineError(f"{len(problems)} input(s) were not scored ({problem_text(problems)}); the other "
                            f"patients are in {folder}. Fix or remove those files.")
