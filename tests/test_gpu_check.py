"""The GPU acceptance check cannot rot: its --dry mode runs every part on the tiny tree on CPU."""
import importlib.util
import re
import subprocess
import sys

import pytest

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
    units = int(re.search(r"\[estimate\] ok .* units (\d+)", done.stdout).group(1))
    plan = re.search(r"^plan: (\d+) units \((\d+) to train", done.stdout, re.M)
    assert plan and int(plan.group(1)) == int(plan.group(2)) == units
    flags = ["--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "output"), "--synthetic",
             "--no-pretrained", *gpu_check.DRY, "--plan", "--force"]
    out = tmp_path / "plan.log"
    with open(out, "w") as console:
        assert subprocess.run([sys.executable, "main.py", *flags], cwd=ROOT, stdout=console, timeout=600).returncode == 0
    assert re.search(rf"^plan: {units} units ", out.read_text(), re.M), out.read_text()[-2000:]


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


def test_the_parts_timeouts_leave_time_before_the_deadline(gpu_check, capsys):
    assert sum(gpu_check.TIMEOUT_S.values()) < 480
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--dry", "--deadline", str(sum(gpu_check.TIMEOUT_S.values()))])
    assert stop.value.code == 2 and "leaves no time" in capsys.readouterr().err
