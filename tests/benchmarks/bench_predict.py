"""Per-patient latency of the predict stage: PNG files to decision, and the model alone, for torch (CPU and GPU),
onnxruntime (CPU), the distilled student's architecture (torch and onnxruntime), and the service's requests per second.

python tests/benchmarks/bench_predict.py [--patients 4] [--per-mag 24] [--backbone NAME] [--image-size 224]
                                         [--student-backbone NAME] [--student-image-size 160] [--student-embed-dim 128]
                                         [--batch-size 32] [--threads 2] [--repeats 3] [--root DIR] [--min-images 8]
                                         [--requests 24] [--clients 2] [--server-seconds 120] [--csv PATH]
Patients are synthetic 700x460 PNGs (the BreakHis size), per-mag images at each of the four magnifications
(BreakHis averages about 24), or the BreakHis-named PNGs under --root (real ones, say). One patient at a time:
list + check the files, decode + resize, the model over the patient's evaluation tuples, the patient row.
The service row: uvicorn on 127.0.0.1 (a free port), --clients httpx clients posting one patient's PNGs per request,
at most --requests requests and --server-seconds seconds. Models are randomly initialised (timing only).
The PRD asks < 50 ms per patient.
"""
import argparse
import socket
from dataclasses import asdict, replace
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backbones import REFERENCE_MODEL, build_model, model_config  # noqa: E402
from config import MAGNIFICATIONS, Config  # noqa: E402
from preprocess.analyze import parse_name  # noqa: E402
from preprocess.synthetic import make_synthetic  # noqa: E402
from preprocess.cache import field_shape  # noqa: E402
from preprocess.tuples import ImageBank, eval_batches, eval_tuples  # noqa: E402
from stages.inference.export import export_onnx  # noqa: E402
from stages.inference.predictor import OnnxModel  # noqa: E402
from stages.training.forward import predict  # noqa: E402
from stages.inference.export import metadata  # noqa: E402
from stages.inference.predictor import Predictor, patient_table, score  # noqa: E402
from stages.inference.serve import Service, create_app  # noqa: E402
from stages.inference.inputs import collect, decode_all, index_frame  # noqa: E402
from utils.env import amp_dtype  # noqa: E402

CLASSES = ["ductal_carcinoma", "fibroadenoma", "Other"]


def patients(root, n, per_mag, min_images):
    """{patient: [files]} with at least min_images files under root; a flat synthetic tree is written when empty."""
    if not any(root.rglob("*.png")):
        print(f"writing {n} synthetic patients x {4 * per_mag} images at 700x460 under {root} ...", file=sys.stderr)
        make_synthetic(root, "full", layout="flat", slides=dict(DC=(n + 1) // 2, F=n // 2), counts=None,
                       per_mag=per_mag, extras=False, missing=False)
    files = pd.DataFrame({"path": sorted(map(str, root.rglob("SOB_*.png")))})
    files["patient"] = [parse_name(Path(f).name)["patient_id"] for f in files["path"]]
    return {p: g["path"].tolist() for p, g in files.groupby("patient") if len(g) >= min_images}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_patient(p, files, device, dtype, batch_size):
    """Seconds of each step for one patient, PNG files to the patient row."""
    times, start = {}, time.perf_counter()
    rows, problems, _ = collect(files, p.mags)
    times["check"] = time.perf_counter() - start
    images, _ = decode_all([r["path"] for r in rows], p.field, p.stain_norm)
    times["decode"] = time.perf_counter() - start - sum(times.values())
    frame = index_frame(rows, p.classes)
    bank = ImageBank(images, {r["path"]: i for i, r in enumerate(rows)})
    tuples, subtype = score(p, frame, bank, batch_size, device, dtype)
    sync(device)
    times["model"] = time.perf_counter() - start - sum(times.values())
    patient_table(tuples, subtype, frame, p)
    times["post"] = time.perf_counter() - start - sum(times.values())
    assert not problems, problems
    return times, len(rows), len(tuples)


def model_alone(p, files, device, dtype, batch_size):
    """Seconds of the prediction path alone (gather, normalise, forward) over one patient's decoded tuples."""
    rows, _, _ = collect(files, p.mags)
    images, _ = decode_all([r["path"] for r in rows], p.field, p.stain_norm)
    bank = ImageBank(images, {r["path"]: i for i, r in enumerate(rows)})
    frame = index_frame(rows, p.classes)
    batches = eval_batches(eval_tuples(frame, p.mags), p.mags, bank.row_of, [], batch_size)
    predict(p.models[0], bank, batches, device, dtype)
    sync(device)
    start = time.perf_counter()
    predict(p.models[0], bank, batches, device, dtype)
    sync(device)
    return time.perf_counter() - start


def bench(name, p, groups, device, args):
    dtype = amp_dtype(device) if not isinstance(p.models[0], OnnxModel) else None
    p.models = [m.to(device) for m in p.models]
    first = next(iter(groups.values()))
    one_patient(p, first, device, dtype, args.batch_size)
    steps, alone, sizes = [], [], []
    for _ in range(args.repeats):
        for files in groups.values():
            times, n_images, n_tuples = one_patient(p, files, device, dtype, args.batch_size)
            steps.append(times)
            sizes.append((n_images, n_tuples))
            alone.append(model_alone(p, files, device, dtype, args.batch_size))
    ms = {k: 1000 * statistics.median(t[k] for t in steps) for k in steps[0]}
    return dict(model=name, device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                threads=torch.get_num_threads(), amp=str(dtype).replace("torch.", "") if dtype else "fp32",
                images=statistics.median(n for n, _ in sizes), tuples=statistics.median(t for _, t in sizes),
                batch_size=args.batch_size,
                **{f"{k}_ms": v for k, v in ms.items()},
                total_ms=1000 * statistics.median(sum(t.values()) for t in steps),
                model_alone_ms=1000 * statistics.median(alone))


def predictor(backbone, size, embed_dim=256):
    settings = model_config(replace(Config(), backbone=backbone, pretrained=False), REFERENCE_MODEL, len(CLASSES),
                            embed_dim=embed_dim)
    model = build_model(REFERENCE_MODEL, **asdict(settings)).eval()
    field = field_shape([700], [460], size)
    return Predictor([model], MAGNIFICATIONS, MAGNIFICATIONS, MAGNIFICATIONS, size, field, False, False, CLASSES,
                     dict(decision=0.5, youden=0.5, sens95=0.5), "fixed_0.5", backbone, model.normalization)


def onnx_twin(p, folder, threads):
    """The predictor's model exported to ONNX and run by onnxruntime on the CPU."""
    path = Path(folder) / f"{p.source}_{p.image_size}.onnx"
    export_onnx([p.models[0]], path, metadata(p, []))
    model = OnnxModel(path, threads)
    return Predictor([model], p.mags, p.pool, p.reads, p.image_size, p.field, False, False, CLASSES, p.threshold, p.rule,
                     f"{p.source} (onnxruntime)", model.normalization)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_load(name, p, groups, args):
    """Requests per second of the service on loopback: bounded request count and time, then the server stops."""
    device = torch.device("cpu")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Service(p, device, None, args.batch_size)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    bodies = [[("files", (Path(f).name, Path(f).read_bytes(), "image/png")) for f in files] for files in groups.values()]
    url, stop = f"http://127.0.0.1:{port}/predict", time.perf_counter() + args.server_seconds
    with httpx.Client(timeout=args.server_seconds) as client:
        assert client.post(url, files=bodies[0]).status_code == 200

    def one(i):
        if time.perf_counter() > stop:
            return None
        with httpx.Client(timeout=args.server_seconds) as client:
            start = time.perf_counter()
            response = client.post(url, files=bodies[i % len(bodies)])
            return time.perf_counter() - start if response.status_code == 200 else float("nan")

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        done = [t for t in pool.map(one, range(args.requests)) if t is not None]
    elapsed = time.perf_counter() - start
    server.should_exit = True
    thread.join(10)
    return dict(model=name, clients=args.clients, requests=len(done), failed=sum(t != t for t in done),
                seconds=elapsed, requests_per_s=len(done) / elapsed, ms_per_request=1000 * statistics.median(done))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--per-mag", type=int, default=24)
    parser.add_argument("--backbone", default=Config().backbone)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--student-backbone", default=Config().student_backbone)
    parser.add_argument("--student-image-size", type=int, default=Config().student_image_size)
    parser.add_argument("--student-embed-dim", type=int, default=Config().student_embed_dim)
    parser.add_argument("--batch-size", type=int, default=Config().batch_size)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=24, help="service requests at most")
    parser.add_argument("--clients", type=int, default=2, help="concurrent service clients")
    parser.add_argument("--server-seconds", type=float, default=120, help="service load time at most")
    parser.add_argument("--root", default="", help="folder of BreakHis-named PNGs, e.g. real ones; synthetic patients "
                        "are written there when it has none (default: a temporary folder)")
    parser.add_argument("--min-images", type=int, default=8, help="time only patients with this many images")
    parser.add_argument("--csv", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_predict_"))
    root.mkdir(parents=True, exist_ok=True)
    groups = patients(root, args.patients, args.per_mag, args.min_images)
    if not groups:
        sys.exit(f"no patient with {args.min_images} or more BreakHis-named PNGs under {root}")
    teacher = predictor(args.backbone, args.image_size)
    student = predictor(args.student_backbone, args.student_image_size, args.student_embed_dim)
    folder = tempfile.mkdtemp(prefix="bench_onnx_")
    onnx = {"torch": teacher, "onnxruntime": onnx_twin(teacher, folder, args.threads),
            "student torch": student, "student onnxruntime": onnx_twin(student, folder, args.threads)}
    cpu = torch.device("cpu")
    rows = [bench(name, p, groups, cpu, args) for name, p in onnx.items()]
    if torch.cuda.is_available():
        rows += [bench(f"{name} GPU", p, groups, torch.device("cuda"), args) for name, p in (("torch", teacher),
                 ("student torch", student))]
    table = pd.DataFrame(rows)
    print(f"Per patient, one patient at a time (model {args.backbone} at {args.image_size} px; student "
          f"{args.student_backbone} at {args.student_image_size} px, embedding {args.student_embed_dim}; median of "
          f"{args.repeats} x {len(groups)} patients); total = check + decode + model + post; model_alone = the "
          f"prediction path on decoded images. PRD target: < 50 ms per patient. GPU rows only where CUDA is.")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    load = pd.DataFrame([serve_load(name, onnx[name], groups, args) for name in ("torch", "student onnxruntime")])
    print(f"Service on 127.0.0.1 (CPU), one patient's PNGs per POST /predict, {args.clients} clients, at most "
          f"{args.requests} requests / {args.server_seconds:.0f} s:")
    print(load.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.csv:
        table.to_csv(args.csv, index=False)
        load.to_csv(Path(args.csv).with_name(Path(args.csv).stem + "_service.csv"), index=False)


if __name__ == "__main__":
    main()
