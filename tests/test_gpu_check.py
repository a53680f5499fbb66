"""The GPU acceptance check cannot rot: its --dry mode runs every part on the tiny tree on CPU."""
import importlib.util
import re
import subprocess
import sys

import pytest

from config import Config
from stages.training.runs import all_runs
from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "benchmarks" / "gpu_check.py"
LAST = re.compile(r"gpu: pipeline ~\d+\.\d min \(est\.\), cv fold \d+ s, compile \d+\.\d\d x, train/limit \d+\.\d\d, "
                  r"eval/train \d+\.\d\d, predict \d+ ms/patient, jobs \d+")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_part_and_ends_with_the_summary(tmp_path, gpu_check):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--work", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    ran = {m.group(1) for m in re.finditer(r"^\[(\w+)\] ok in \d+ s", done.stdout, re.M)}
    assert ran == set(gpu_check.PARTS) and "FAILED" not in done.stdout
    assert LAST.fullmatch(lines[-1]), lines[-1]
    assert lines[-1].endswith("jobs 1")
    assert "backend gloo" in done.stdout
    units = sum(1 if spec.stage == "fixed" else Config().n_folds for spec in all_runs(Config()))
    assert re.search(rf"\[estimate\] ok .* runs {units},", done.stdout)


def test_a_failing_part_is_named_and_the_others_still_run(tmp_path, gpu_check, capsys):
    check = gpu_check.Check(tmp_path, dry=True, deadline_s=60)

    def broken(_):
        raise ValueError("no such device")

    assert gpu_check.part(check, "cv", broken) is None
    assert gpu_check.part(check, "jobs", lambda _: dict(jobs=3, runs={})) == dict(jobs=3, runs={})
    out = capsys.readouterr().out
    assert re.search(r"^\[cv\] FAILED after \d+ s: ValueError: no such device$", out, re.M)
    assert re.search(r"^\[jobs\] ok in \d+ s: jobs 3", out, re.M)
    check.results["compile"] = None
    with pytest.raises(RuntimeError, match="needs the cv part"):
        gpu_check.compiled(check)
    line = gpu_check.last_line(check)
    assert line == ("gpu: pipeline ~n/a min (est.), cv fold n/a s, compile n/a x, train/limit n/a, eval/train n/a, "
                    "predict n/a ms/patient, jobs 3")


def test_run_costs_come_from_the_measured_baselines(gpu_check):
    runs = dict(simple_concat=10.0, single_40X=2.5, resnet50_transfer_40X=30.0)
    assert gpu_check.cost("single_40X", runs) == 0.25
    assert gpu_check.cost("mmnet_only_40X", runs) == 0.25
    assert gpu_check.cost("resnet50_transfer_40X", runs) == 3.0
    assert gpu_check.cost("mmnet_no_hma", runs) == gpu_check.cost("mmnet", runs) == 1.0
    assert gpu_check.cost("single_40X", {}) == 1.0
