"""Runs spread over --jobs processes and torchrun ranks: every run done exactly once, the same splits and runs."""
import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_pipeline import flags

STAGES = "analyze,split,cv,fixed"
UNITS = {"mmnet/fold_0", "mmnet/fold_1", "mmnet/fold_2", "mmnet/fixed"} | {f"mmnet_fixed_member/member_{i}" for i in range(3)}
ENSEMBLE = "mmnet_fixed_ensemble/fixed"


def command(cfg, out, *extra):
    cfg = cfg.__class__(**{**cfg.__dict__, "output_dir": str(out)})
    return [*flags(cfg, STAGES), "--n-folds", "3", "--epochs", "1", *extra]


def finished(out):
    return {f"{p.parent.parent.name}/{p.parent.name}" for p in Path(out).glob("runs/*/*/metrics.json")}


def result_lines(text):
    return re.findall(r"\[(\w+/\w+)\] TEST patient AUC", text)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, tiny_root):
    from dataclasses import replace
    from config import Config
    from tests.conftest import TEST_SETTINGS
    out = tmp_path_factory.mktemp("seq") / "output"
    cfg = replace(Config(), **dict(TEST_SETTINGS, data_root=str(tiny_root)))
    done = subprocess.run([sys.executable, "main.py", *command(cfg, out, "--jobs", "1")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cfg, out


def same_splits(a, b):
    names = sorted(p.name for p in (Path(a) / "splits").glob("*.csv"))
    return names and all(filecmp.cmp(Path(a) / "splits" / n, Path(b) / "splits" / n, shallow=False) for n in names)


def test_jobs_run_every_unit_once_with_one_line_each(sequential, tmp_path):
    cfg, reference = sequential
    out = tmp_path / "output"
    done = subprocess.run([sys.executable, "main.py", *command(cfg, out, "--jobs", "2")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(result_lines(done.stdout)) == sorted(UNITS)
    assert finished(out) == finished(reference) == UNITS | {ENSEMBLE}
    assert same_splits(out, reference)
    for unit in ("mmnet/fold_0", "mmnet/fold_1"):
        assert len(result_lines((out / "runs" / unit / "run.log").read_text())) == 1


def test_torchrun_two_ranks_share_the_runs(sequential, tmp_path):
    cfg, reference = sequential
    out = tmp_path / "output"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "main.py"]
    done = subprocess.run([*launch, *command(cfg, out, "--jobs", "1")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = (out / "logs" / "pipeline.log").read_text() + (out / "logs" / "pipeline.rank1.log").read_text()
    assert sorted(result_lines(logs)) == sorted(UNITS)
    assert finished(out) == finished(reference) == UNITS | {ENSEMBLE}
    assert same_splits(out, reference)
    assert (out / "models" / "best_model.pth").exists()


def test_two_processes_on_one_output_folder_train_each_run_once(sequential, tmp_path):
    cfg, reference = sequential
    out = tmp_path / "output"
    prepare = subprocess.run([sys.executable, "main.py", *command(cfg, out), "--stages", "analyze,split"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert prepare.returncode == 0, prepare.stdout[-3000:]
    args = [sys.executable, "main.py", *command(cfg, out), "--stages", "cv", "--jobs", "1"]
    both = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    texts = [p.communicate(timeout=600)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], texts[0][-2000:] + texts[1][-2000:]
    trained = result_lines(texts[0]) + result_lines(texts[1])
    assert sorted(trained) == sorted(UNITS - {"mmnet/fixed"})
    assert finished(out) == UNITS - {"mmnet/fixed"}
    assert not list(out.glob("runs/*/*/.lock"))


def test_a_worker_stops_when_its_parent_dies(tmp_path):
    import os
    import time
    pid_file = tmp_path / "child.pid"
    script = (
        "import multiprocessing as mp, os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from stages.schedule import exit_with\n"
        "def child(parent, path):\n"
        "    exit_with(parent)\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        f"    p = mp.get_context('spawn').Process(target=child, args=(os.getpid(), {str(pid_file)!r}))\n"
        "    p.start()\n"
        f"    while not os.path.exists({str(pid_file)!r}): time.sleep(0.1)\n"
        "    os._exit(0)\n"
    )
    (tmp_path / "parent.py").write_text(script)
    subprocess.run([sys.executable, str(tmp_path / "parent.py")], timeout=60, check=True)
    time.sleep(0.5)
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{child}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}")
