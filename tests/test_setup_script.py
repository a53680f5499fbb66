import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from preprocess.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(slides=dict(A=1, F=1, DC=1), per_mag=1, size=(32, 24))


def setup_sh(*args, env=None, weights=False):
    skips = ["--skip-install", "--skip-gpu-info"] + ([] if weights else ["--skip-weights"])
    run = subprocess.run(["bash", str(ROOT / "setup.sh"), *skips, *map(str, args)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))
    return run.returncode, run.stdout + run.stderr


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    """A small BreaKHis_v1.tar.gz in the original layout."""
    tmp = tmp_path_factory.mktemp("tarball")
    src = make_synthetic(tmp / "src", preset="tiny", **SMALL)
    path = tmp / "BreaKHis_v1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "BreaKHis_v1", arcname="BreaKHis_v1")
    return path


def test_help_lists_the_flags():
    code, text = setup_sh("--help")
    assert code == 0
    for flag in ("--skip-install", "--skip-weights", "--url", "--tarball", "--data-dir", "--dest", "main.py --demo"):
        assert flag in text


def test_extracts_counts_and_is_idempotent(tarball, tmp_path):
    dest = tmp_path / "data"
    code, text = setup_sh("--tarball", tarball, "--dest", dest)
    assert code == 0, text
    pngs = list((dest / "BreaKHis_v1" / "histology_slides" / "breast").rglob("*.png"))
    assert len(pngs) == 12
    assert "found 12 images" in text and "7909" in text
    keep = dest / "BreaKHis_v1" / "my_notes.txt"
    keep.write_text("mine")
    code, text = setup_sh("--tarball", tarball, "--dest", dest)
    assert code == 0 and "skipping the download" in text
    assert keep.read_text() == "mine"
    assert len(list((dest / "BreaKHis_v1").rglob("*.png"))) == 12


def test_existing_data_dir_is_only_counted(tarball, tmp_path):
    dest = tmp_path / "data"
    setup_sh("--tarball", tarball, "--dest", dest)
    code, text = setup_sh("--data-dir", dest / "BreaKHis_v1", "--dest", tmp_path / "other")
    assert code == 0 and "found 12 images" in text and "--data-root" in text
    assert not (tmp_path / "other").exists()


def test_unreachable_url_gives_the_offline_message(tmp_path):
    url = "http://127.0.0.1:9/BreaKHis_v1.tar.gz"
    code, text = setup_sh("--url", url, "--dest", tmp_path / "a")
    assert code == 1 and "could not get BreakHis" in text and "python main.py --demo" in text
    code, text = setup_sh("--dest", tmp_path / "b", env={"BREAKHIS_URL": url})
    assert code == 0 and "could not get BreakHis" in text
    assert not list((tmp_path / "b").rglob("*.part"))


def test_a_bad_tarball_fails_without_leaving_a_tree(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball")
    code, text = setup_sh("--tarball", bad, "--dest", tmp_path / "data")
    assert code == 1
    assert not (tmp_path / "data" / "BreaKHis_v1").exists()


def test_offline_weights_step_warns_names_each_backbone_and_goes_on(tmp_path):
    env = dict(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"),
               TORCH_HOME=str(tmp_path / "torch"))
    code, text = setup_sh("--skip-data", weights=True, env=env)
    assert code == 0, text
    assert "caching the pretrained weights" in text and "WARNING: some pretrained weights are not cached" in text
    for name in ("mobilenetv4_conv_small", "resnet50", "mobilenetv3_small_050"):
        assert f"backbone '{name}'" in text
    code, text = setup_sh("--skip-data", env=env)
    assert code == 0 and "pretrained weights" not in text


def test_torch_outside_the_tested_range_warns_and_goes_on():
    code, text = setup_sh("--check-torch")
    assert code == 0 and "WARNING" not in text and "tested range" in text
    code, text = setup_sh("--check-torch", env={"SETUP_TESTED_TORCH": "1.0"})
    assert code == 0 and "WARNING: the image's torch" in text and "outside the tested range 1.0.x" in text
    assert "torchvision" not in text.split("WARNING")[1].split("\n")[0]


def test_the_runpod_file_pins_everything_the_lock_does_except_torch():
    pins = lambda name: {l.split("==")[0]: l.split()[0] for l in (ROOT / name).read_text().splitlines() if "==" in l}  # noqa: E731
    lock, runpod, direct = pins("requirements.lock"), pins("requirements.runpod"), pins("requirements.txt")
    assert {"torch", "torchvision", "triton"} & set(runpod) == set()
    assert {k: v for k, v in lock.items() if k in runpod} == runpod
    assert set(lock) - set(runpod) <= {k for k in lock if k in ("torch", "torchvision", "triton")
                                       or k.startswith(("nvidia-", "cuda-"))}
    assert all(direct[k] == lock[k.lower()] for k in direct), "requirements.txt and the lock disagree: bash .ci/lock"
