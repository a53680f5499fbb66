"""The service: POST /predict scores uploaded images with the predict stage's code, GET /health, GET /model.

python -m stages.inference.serve --output-dir OUT [--checkpoint FILE | --onnx FILE | --ensemble] [--host 127.0.0.1] [--port 8000]
"""
import argparse
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from preprocess.analyze import IMAGE_EXTS, parse_name
from preprocess.tuples import slot_labels
from stages.inference.predictor import checkpoint_paths, load_predictor, onnx_predictor, score_images
from utils.env import amp_dtype, resolve_device
from utils.helpers import PipelineError, is_finite

MIB = 2**20
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Limits:
    """What one request may send: files and bytes in all."""
    max_files: int = 512
    max_bytes: int = 256 * MIB


@dataclass
class Service:
    """The loaded predictor and how it runs: device, AMP dtype, batch size, request limits, what was loaded."""
    predictor: object
    device: torch.device
    dtype: torch.dtype | None = None
    batch_size: int = 32
    limits: Limits = Limits()
    kind: str = "torch"


class BadUpload(Exception):
    """A request the client can fix: its HTTP status and what was wrong."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def magnification_of(value, mags):
    """'200', '200x', '200X' -> '200X'; a BadUpload for a magnification the model does not read."""
    mag = value.strip().upper().rstrip("X") + "X"
    if mag not in mags:
        raise BadUpload(422, f"unknown magnification '{value}': this model reads {', '.join(mags)}")
    return mag


def file_name(upload, i):
    """The upload's base name with unsafe characters replaced; never hidden, never empty."""
    name = UNSAFE.sub("_", Path(upload.filename or "").name).lstrip(".")
    return name or f"upload_{i}"


def file_mags(uploads, values, mags):
    """Magnification per upload: a BreakHis name's own; else the form value (one for all, or one per file)."""
    if len(values) not in (0, 1, len(uploads)):
        raise BadUpload(422, f"{len(values)} magnification values for {len(uploads)} files: give one for all files "
                             f"or one per file, in order")
    given = [magnification_of(v, mags) for v in values] * (len(uploads) if len(values) == 1 else 1)
    out = []
    for i, upload in enumerate(uploads):
        if Path(file_name(upload, i)).suffix.lower() not in IMAGE_EXTS:
            raise BadUpload(415, f"{upload.filename}: not an image file (expected {', '.join(IMAGE_EXTS)})")
        info = parse_name(file_name(upload, i))
        form = given[i] if given else None
        if info is not None and form is not None and form != info["magnification"]:
            raise BadUpload(422, f"{upload.filename}: its name says {info['magnification']}, the form says {form}")
        if info is None and form is None:
            raise BadUpload(422, f"{upload.filename}: not a BreakHis name (SOB_M_DC-14-2980-400-012.png), so give "
                                 f"its magnification as the form field 'magnification' ({', '.join(mags)})")
        out.append(info["magnification"] if info is not None else form)
    return out


def save_uploads(uploads, mags, folder, limits):
    """Each upload under folder/<i>/<magnification>/<name>, as the predict stage reads a folder; bytes bounded."""
    total = 0
    for i, (upload, mag) in enumerate(zip(uploads, mags)):
        data = upload.file.read(limits.max_bytes - total + 1)
        total += len(data)
        if total > limits.max_bytes:
            raise BadUpload(413, f"the upload exceeds {limits.max_bytes / MIB:.3g} MiB; send fewer or smaller images")
        target = folder / str(i) / mag / file_name(upload, i)
        target.parent.mkdir(parents=True)
        target.write_bytes(data)


def finite(value):
    """A number as JSON has it: None where it is not finite."""
    value = value.item() if hasattr(value, "item") else value
    return value if is_finite(value) else None


def patient_entries(scored, p):
    """Per patient: P(malignant), both decisions, subtype, magnification weights, and per image its probability."""
    images = scored.images[scored.images["status"] == "scored"]
    out = []
    for row in scored.patients.to_dict("records"):
        own = images[images["patient_id"] == row["patient_id"]]
        out.append(dict(
            patient_id=row["patient_id"], prob_malignant=finite(row["prob_malignant"]),
            decision=row["decision"], decision_high_sensitivity=row["decision_high_sensitivity"],
            threshold=finite(row["threshold"]), threshold_rule=row["threshold_rule"],
            threshold_high_sensitivity=finite(row["threshold_high_sensitivity"]),
            subtype=row["subtype"] or None, subtype_prob=finite(row["subtype_prob"]),
            magnification_weights={m: finite(row[f"weight_{m}"]) for m in slot_labels(p.mags)},
            images_per_magnification={m: int(row[f"n_{m}"]) for m in p.reads}, tuples=int(row["n_tuples"]),
            true_class=row["true_class"] or None,
            images=[dict(file=Path(r["path"]).name, magnification=r["magnification"],
                         prob_malignant=finite(r["prob_malignant"])) for r in own.to_dict("records")]))
    return out


def predict_uploads(service, uploads, values, lock):
    """Uploaded files -> the predict stage's patient rows; every unusable file is a BadUpload naming it."""
    p, limits = service.predictor, service.limits
    if len(uploads) > limits.max_files:
        raise BadUpload(413, f"{len(uploads)} files in one request; at most {limits.max_files}")
    mags = file_mags(uploads, values, p.reads)
    with tempfile.TemporaryDirectory(prefix="mmnet_serve_") as tmp:
        save_uploads(uploads, mags, Path(tmp), limits)
        with lock:
            scored = score_images(p, [tmp], service.batch_size, service.device, service.dtype)
        bad = [f"{Path(path).name}: {why}".replace(f"{tmp}{os.sep}", "")
               for path, why in scored.problems + scored.left_out]
        if bad:
            raise BadUpload(422, f"{len(bad)} file(s) cannot be scored: {'; '.join(bad[:10])}")
        return dict(model=p.source, patients=patient_entries(scored, p))


def describe(service):
    p = service.predictor
    return dict(kind=service.kind, source=p.source, models=len(p.models), magnifications=list(p.mags),
                reads=list(p.reads), image_size=p.image_size, field=list(p.field), normalization=p.normalization,
                stain_norm=p.stain_norm,
                classes={"binary": ["benign", "malignant"], "subtype": list(p.classes)}, thresholds=p.threshold,
                threshold_rule=p.rule, runs=p.runs, device=str(service.device), max_files=service.limits.max_files,
                max_mib=service.limits.max_bytes / MIB)


def create_app(service):
    """The FastAPI app around one loaded predictor; predictions run one at a time."""
    app = FastAPI(title="MMNet BreakHis", description="Benign/malignant and subtype per patient from histology images")
    lock = threading.Lock()

    @app.middleware("http")
    async def bounded(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > service.limits.max_bytes + MIB:
            return JSONResponse({"detail": f"the upload exceeds {service.limits.max_bytes / MIB:.3g} MiB"}, 413)
        return await call_next(request)

    @app.exception_handler(BadUpload)
    async def bad_upload(request, e):
        return JSONResponse({"detail": e.message}, e.status)

    @app.exception_handler(PipelineError)
    async def pipeline_error(request, e):
        return JSONResponse({"detail": str(e)}, 422)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": service.predictor.source}

    @app.get("/model")
    def model():
        return describe(service)

    @app.post("/predict")
    def predict(files: list[UploadFile] = File(...), magnification: list[str] = Form(default=[])):
        return predict_uploads(service, files, magnification, lock)

    return app


def load_service(args):
    """The Service of the command line: an ONNX file, or checkpoint(s) as the predict stage loads them."""
    limits = Limits(args.max_files, int(args.max_mb * MIB))
    if args.onnx:
        return Service(onnx_predictor(args.onnx, args.threads), torch.device("cpu"), None, args.batch_size, limits,
                       "onnxruntime")
    device = resolve_device(args.device)
    dtype = amp_dtype(device) if args.amp else None
    paths = checkpoint_paths(args.output_dir, args.checkpoint, args.ensemble)
    return Service(load_predictor(paths, device), device, dtype, args.batch_size, limits, "torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m stages.inference.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output", help="where models/best_model.pth is (default: output)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", default="", help="a checkpoint instead of OUT/models/best_model.pth")
    model.add_argument("--onnx", default="", help="an exported ONNX file (python main.py --stages export)")
    model.add_argument("--ensemble", action="store_true", help="the mean of the CV fold models")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the default)")
    parser.add_argument("--max-files", type=int, default=Limits.max_files, help="files per request")
    parser.add_argument("--max-mb", type=float, default=Limits.max_bytes / MIB, help="MiB per request")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        service = load_service(args)
    except PipelineError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"Serving {service.predictor.source} ({service.kind}, {service.device}) on http://{args.host}:{args.port}: "
          f"POST /predict, GET /health, GET /model", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
