"""Export stage: best_model.pth, --checkpoint FILE or the fold ensemble (--ensemble) as one ONNX graph (the mean of
the models; dynamic batch, the magnification mask an input) with its settings in metadata_props, then onnxruntime
checked against torch on the fixed split's test tuples."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from preprocess.cache import cache_folder
from preprocess.tuples import image_bank, slot_labels
from stages.inference.predictor import INPUTS, OUTPUTS, checkpoint_paths, load_predictor, onnx_predictor, score
from stages.training.data import split_frames
from stages.training.runs import REFERENCE
from utils.helpers import PipelineError, index_path, log, models_dir, split_path

TOLERANCE = 1e-4
CPU = torch.device("cpu")


class Averaged(nn.Module):
    """What the graph computes: the mean over the models of P(malignant), subtype probabilities and magnification
    weights of normalised (B, M, 3, S, S) tuples with their presence mask (B, M)."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, images, mask):
        outs = [m(images, mask) for m in self.models]
        prob = torch.stack([torch.sigmoid(o["binary_logits"].float()) for o in outs]).mean(0)
        subtype = torch.stack([o["subtype_logits"].float().softmax(1) for o in outs]).mean(0)
        weights = torch.stack([o["mag_weights"].float() for o in outs]).mean(0)
        return prob, subtype, weights


def example_inputs(n_mags, field, batch=2):
    """Random whole fields (B, slots, 3, height, width) and a mask with some slots absent."""
    mask = torch.ones(batch, n_mags, dtype=torch.bool)
    mask[-1, 1:] = False
    return torch.randn(batch, n_mags, 3, *field), mask


def quiet_export(module, inputs, path):
    """torch.onnx.export through the dynamo exporter (the TorchScript one cannot trace MSAP's adaptive pooling)."""
    batch = torch.export.Dim("batch", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    program = torch.onnx.export(module, inputs, dynamo=True, verbose=False, input_names=list(INPUTS),
                                output_names=list(OUTPUTS), dynamic_shapes={"images": {0: batch}, "mask": {0: batch}})
    program.save(str(path))


def export_onnx(models, path, meta):
    """Write the models' mean as ONNX at `path` with `meta` (JSON values) in its metadata_props."""
    module = Averaged([m.cpu().eval() for m in models]).eval()
    inputs = example_inputs(len(meta["magnifications"]), tuple(meta["field"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
    try:
        quiet_export(module, inputs, tmp)
        write_metadata(tmp, meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_metadata(path, meta):
    model = onnx.load(str(path))
    known = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        prop = known.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value)
    onnx.save(model, str(path))


def onnx_path(cfg):
    name = f"{REFERENCE}_fold_ensemble" if cfg.ensemble else Path(cfg.checkpoint or "best_model.pth").stem
    return models_dir(cfg) / f"{name}.onnx"


def metadata(p, paths):
    """What a consumer of the graph needs besides it: classes, magnifications, input size and normalisation, the
    thresholds, stain normalisation and TTA, and where it came from (checkpoints, the runs' records)."""
    return dict(model_name=p.models[0].name, source=p.source, members=[str(x) for x in paths],
                classes={"binary": ["benign", "malignant"], "subtype": list(p.classes)},
                magnifications=list(p.mags), pool=list(p.pool), reads=list(p.reads), image_size=p.image_size,
                field=list(p.field),
                normalization=p.normalization, threshold=p.threshold, threshold_rule=p.rule, stain_norm=p.stain_norm,
                tta=p.tta, runs=p.runs)


def fixed_test_data(cfg, p):
    """The fixed split's test rows and the image bank at the model's size, or None without an index and split."""
    if not index_path(cfg).exists() or not split_path(cfg, "fixed").exists():
        return None
    index, parts = split_frames(cfg, "fixed")
    bank = image_bank(index["path"].astype(str).tolist(), p.field, p.stain_norm, cache_folder(cfg))
    return parts["test"], bank


def largest_gaps(a, b):
    """Largest absolute differences of P(malignant), subtype probabilities and magnification weights."""
    return dict(max_abs_prob=float(np.abs(a[0] - b[0]).max()), max_abs_subtype_prob=float(np.abs(a[1] - b[1]).max()),
                max_abs_mag_weight=float(np.abs(a[2] - b[2]).max()))


def tuple_outputs(tuples, subtype, mags):
    return tuples["prob_malignant"].to_numpy(), subtype, tuples[[f"w_{m}" for m in mags]].to_numpy()


def parity(cfg, p, q):
    """torch against onnxruntime on the fixed split's test tuples (random tuples without a split)."""
    data = fixed_test_data(cfg, p)
    if data is None:
        x, mask = example_inputs(len(p.mags), p.field, batch=8)
        with torch.no_grad():
            want = [v.numpy() for v in Averaged(p.models)(x, mask)]
        got = q.models[0].session.run(None, {"images": x.numpy(), "mask": mask.numpy()})
        return dict(on="random tuples (no fixed split under --output-dir)", tuples=len(x), **largest_gaps(want, got))
    frame, bank = data
    want = tuple_outputs(*score(p, frame, bank, cfg.batch_size, CPU), slot_labels(p.mags))
    got = tuple_outputs(*score(q, frame, bank, cfg.batch_size, CPU), slot_labels(p.mags))
    return dict(on="fixed split test tuples", tuples=len(want[0]), patients=int(frame["patient_id"].nunique()),
                **largest_gaps(want, got))


def run_export(cfg):
    """Stage: the model (or the fold ensemble's mean) as ONNX with its settings, checked against torch."""
    paths = checkpoint_paths(cfg.output_dir, cfg.checkpoint, cfg.ensemble)
    p = load_predictor(paths, CPU)
    path = onnx_path(cfg)
    log(f"Exporting {p.source} ({len(paths)} model(s)) to {path} (dynamic batch; inputs images, mask)")
    export_onnx(p.models, path, metadata(p, paths))
    check = parity(cfg, p, onnx_predictor(path))
    write_metadata(path, {"parity": check})
    log(f"onnxruntime vs torch on {check['tuples']} {check['on']}: max |difference| of P(malignant) "
        f"{check['max_abs_prob']:.1e}, subtype probabilities {check['max_abs_subtype_prob']:.1e}, magnification "
        f"weights {check['max_abs_mag_weight']:.1e}")
    if check["max_abs_prob"] > TOLERANCE:
        raise PipelineError(f"{path} differs from torch by {check['max_abs_prob']:.1e} in P(malignant) (tolerance "
                            f"{TOLERANCE}); do not use it. Check the torch and onnxruntime versions.")
    log(f"-> {path} ({path.stat().st_size / 2**20:.1f} MiB)")
