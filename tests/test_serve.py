"""The service: the predict stage's numbers over HTTP, bad uploads answered with a 4xx, one real uvicorn on loopback."""
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

import main
from stages.training.checkpoint import load_model
from stages.inference.export import export_onnx
from stages.inference.export import metadata
from stages.inference.predictor import checkpoint_paths, load_predictor
from stages.training.runs import REFERENCE
from stages.inference.serve import Limits, create_app, load_service, parse_args
from tests.conftest import ROOT, copy_output

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def served(fixed_output, tmp_path_factory):
    """(config, TestClient of the torch service, the fixed split's test images)."""
    cfg = copy_output(fixed_output, tmp_path_factory.mktemp("serve") / "output")
    service = load_service(parse_args(["--output-dir", cfg.output_dir, "--device", "cpu", "--batch-size", "4"]))
    pred = pd.read_csv(Path(cfg.output_dir) / "runs" / REFERENCE / "fixed" / "predictions.csv", dtype={"patient_id": str})
    test = pred[(pred["role"] == "test") & (pred["level"] == "tuple")]
    images = sorted({p for c in test.filter(like="path_") for p in test[c].dropna() if p})
    return cfg, TestClient(create_app(service)), images


def uploads(paths):
    return [("files", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def patients_of(response):
    assert response.status_code == 200, response.text
    return {p["patient_id"]: p for p in response.json()["patients"]}


def test_health_and_model(served):
    cfg, client, _ = served
    assert client.get("/health").json()["status"] == "ok"
    described = client.get("/model").json()
    ckpt = load_model(Path(cfg.output_dir) / "models" / "best_model.pth")[1]
    assert described["thresholds"] == pytest.approx(ckpt["threshold"])
    assert described["magnifications"] == ckpt["magnifications"] and described["kind"] == "torch"
    assert described["runs"] == [{k: ckpt["record"][k] for k in ("run", "split", "digest", "commit", "trained_by",
                                                                 "tuning")}]


def test_same_numbers_as_the_predict_stage(served, tmp_path):
    cfg, client, images = served
    folder = tmp_path / "same"
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder)
    args = ["--stages", "predict", "--input", str(folder), "--output-dir", cfg.output_dir, "--batch-size", "4", "--no-amp"]
    assert main.main(args) == 0
    out = next((Path(cfg.output_dir) / "predictions").glob("same_*"))
    stage = pd.read_csv(out / "patients.csv", dtype={"patient_id": str}, keep_default_na=False).set_index("patient_id")
    per_image = pd.read_csv(out / "images.csv").set_index(pd.read_csv(out / "images.csv")["path"].map(lambda p: Path(p).name))
    got = patients_of(client.post("/predict", files=uploads(images)))
    assert sorted(got) == sorted(stage.index)
    for pid, row in stage.iterrows():
        answer = got[pid]
        assert answer["prob_malignant"] == pytest.approx(row["prob_malignant"], abs=TOLERANCE)
        assert answer["decision"] == row["decision"]
        assert answer["decision_high_sensitivity"] == row["decision_high_sensitivity"]
        assert answer["subtype"] == row["subtype"] and answer["subtype_prob"] == pytest.approx(row["subtype_prob"])
        assert answer["magnification_weights"]["40X"] == pytest.approx(row["weight_40X"], abs=TOLERANCE)
        assert answer["true_class"] == row["true_class"]
        for image in answer["images"]:
            assert image["prob_malignant"] == pytest.approx(per_image.loc[image["file"], "prob_malignant"], abs=TOLERANCE)
    assert sum(len(p["images"]) for p in got.values()) == len(images)


def test_any_image_with_its_magnification_as_a_field(served):
    _, client, images = served
    body = Path(images[0]).read_bytes()
    files = [("files", ("scan.png", body, "image/png")), ("files", ("other.png", body, "image/png"))]
    got = patients_of(client.post("/predict", files=files, data={"magnification": ["200", "400X"]}))
    assert sorted(got) == ["other", "scan"]
    assert got["scan"]["images"][0]["magnification"] == "200X" and got["other"]["images"][0]["magnification"] == "400X"
    assert got["scan"]["images_per_magnification"] == {"40X": 0, "100X": 0, "200X": 1, "400X": 0}
    assert got["scan"]["magnification_weights"]["200X"] == pytest.approx(1.0)
    assert got["scan"]["true_class"] is None


BAD = ["not an image", "truncated png", "text file", "unknown magnification", "no magnification",
       "conflicting magnification", "same file twice", "too many files", "too large", "no files"]


def bad_requests(images):
    png = Path(images[0]).read_bytes()
    name = Path(images[0]).name
    return {
        "not an image": dict(files=[("files", (name, b"hello, not a picture", "image/png"))]),
        "truncated png": dict(files=[("files", (name, png[: len(png) // 2], "image/png"))]),
        "text file": dict(files=[("files", ("notes.txt", b"text", "text/plain"))]),
        "unknown magnification": dict(files=[("files", ("scan.png", png, "image/png"))], data={"magnification": "50X"}),
        "no magnification": dict(files=[("files", ("scan.png", png, "image/png"))]),
        "conflicting magnification": dict(files=[("files", (name, png, "image/png"))], data={"magnification": "400X"}
                                          if "-40-" in name else {"magnification": "40X"}),
        "same file twice": dict(files=uploads([images[0], images[0]])),
        "too many files": dict(files=uploads(images[:4])),
        "too large": dict(files=uploads(images[:1] * 3)),
        "no files": dict(data={"magnification": "40X"}),
    }


@pytest.mark.parametrize("case", BAD)
def test_bad_uploads_get_a_4xx_with_a_message(served, case):
    cfg, _, images = served
    service = load_service(parse_args(["--output-dir", cfg.output_dir, "--device", "cpu"]))
    size = len(Path(images[0]).read_bytes())
    service.limits = Limits(max_files=3, max_bytes=int(2.5 * size))
    client = TestClient(create_app(service), raise_server_exceptions=False)
    requests = bad_requests(images)
    assert list(requests) == BAD
    response = client.post("/predict", **requests[case])
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.json()["detail"]
    if case in ("not an image", "truncated png", "text file"):
        assert requests[case]["files"][0][1][0] in response.json()["detail"]
    assert client.get("/health").status_code == 200
    assert len(patients_of(client.post("/predict", files=uploads(images[:1])))) == 1


def test_onnx_service_matches_torch(served, tmp_path):
    cfg, client, images = served
    paths = checkpoint_paths(cfg.output_dir)
    p = load_predictor(paths, torch.device("cpu"))
    export_onnx(p.models, tmp_path / "model.onnx", metadata(p, paths))
    onnx = TestClient(create_app(load_service(parse_args(["--onnx", str(tmp_path / "model.onnx")]))))
    assert onnx.get("/model").json()["kind"] == "onnxruntime"
    want = patients_of(client.post("/predict", files=uploads(images[:12])))
    got = patients_of(onnx.post("/predict", files=uploads(images[:12])))
    assert sorted(got) == sorted(want)
    for pid in want:
        assert got[pid]["prob_malignant"] == pytest.approx(want[pid]["prob_malignant"], abs=1e-4)
        assert got[pid]["decision"] == want[pid]["decision"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_on_loopback(served):
    """python -m stages.inference.serve on a free 127.0.0.1 port, driven by httpx, stopped at the end (killed after 120 s)."""
    cfg, client, images = served
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stages.inference.serve", "--output-dir", cfg.output_dir, "--port", str(port),
                             "--device", "cpu", "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        got = patients_of(httpx.post(f"{url}/predict", files=uploads(images[:8]), timeout=60))
        want = patients_of(client.post("/predict", files=uploads(images[:8])))
        assert sorted(got) == sorted(want)
        assert np.allclose([got[k]["prob_malignant"] for k in want], [want[k]["prob_malignant"] for k in want],
                           atol=TOLERANCE)
        assert httpx.post(f"{url}/predict", files=[("files", ("x.png", b"junk", "image/png"))],
                          data={"magnification": "40X"}, timeout=30).status_code == 422
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        watchdog.cancel()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
