"""ONNX: one graph for one model or the mean of several (dynamic batch, the magnification mask an input), its
settings in metadata_props, and an onnxruntime session that answers like a model so predict() can run it."""
import json
import logging
import os

import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from utils.helpers import PipelineError

INPUTS = ("images", "mask")
OUTPUTS = ("prob_malignant", "subtype_prob", "mag_weights")
META = ("model_name", "source", "members", "classes", "magnifications", "image_size", "normalization", "threshold",
        "threshold_rule", "stain_norm", "parity")


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


def example_inputs(n_mags, size, batch=2):
    mask = torch.ones(batch, n_mags, dtype=torch.bool)
    mask[-1, 1:] = False
    return torch.randn(batch, n_mags, 3, size, size), mask


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
    inputs = example_inputs(len(meta["magnifications"]), int(meta["image_size"]))
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


def read_metadata(session):
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in META if k not in props and k not in ("parity", "threshold_rule")]
    if missing:
        raise PipelineError(f"the ONNX file lacks {', '.join(missing)} in its metadata: export it with this pipeline "
                            f"(python main.py --stages export).")
    return {k: json.loads(v) for k, v in props.items() if k in META}


def session_of(path, threads=0):
    """An onnxruntime session on the GPU where onnxruntime has one, else on the CPU (`threads` 0: its default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for any unusable file
        raise PipelineError(f"{path} is not a usable ONNX model ({type(e).__name__}: {str(e)[:200]}). Export it "
                            f"again: python main.py --stages export") from None


class OnnxModel:
    """An onnxruntime session with a model's interface: eval(), normalization, and (x, mask) -> the output dict,
    whose logits are those of the graph's probabilities."""

    def __init__(self, path, threads=0):
        self.session = session_of(path, threads)
        self.meta = read_metadata(self.session)
        self.normalization = self.meta["normalization"]
        self.magnifications = tuple(self.meta["magnifications"])
        self.used_mags = list(range(len(self.magnifications)))

    def eval(self):
        return self

    def to(self, device):
        return self

    def __call__(self, x, mask):
        feeds = {"images": x.detach().float().cpu().numpy(), "mask": mask.detach().bool().cpu().numpy()}
        prob, subtype, weights = (torch.from_numpy(v).to(x.device) for v in self.session.run(list(OUTPUTS), feeds))
        return dict(binary_logits=torch.logit(prob.double()).float(), subtype_logits=subtype.log(),
                    mag_weights=weights)
