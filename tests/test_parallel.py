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
UNITS = {"mmnet/fold_0", "mmnet/fold_1", "mmnet/fold_2", "mmnet/fixed"}


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
    assert finished(out) == finished(reference) == UNITS
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
    assert finished(out) == finished(reference) == UNITS
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
