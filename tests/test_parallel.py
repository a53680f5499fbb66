"""Runs spread over --jobs processes and torchrun ranks: every run done exactly once, the same splits and runs."""
import filecmp
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import ROOT, prepared_output
from tests.test_lock import write_lock
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


def trainer(out, unit):
    return json.loads((out / "runs" / unit / "record.json").read_text())["trained_by"].split("@")[0]


def test_two_processes_on_one_output_folder_each_train_a_share(sequential, tmp_path):
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
    cv = {u for u in UNITS if u.startswith("mmnet/fold_")}
    trained = [set(result_lines(text)) for text in texts]
    assert sorted(trained[0] | trained[1]) == sorted(cv) and not trained[0] & trained[1]
    assert trained[0] and trained[1], texts
    assert finished(out) == cv
    assert not list(out.glob("runs/*/*/.lock"))
    pids = [str(p.pid) for p in both]
    for mine, other, text, units in zip(pids, pids[::-1], texts, trained):
        assert {trainer(out, unit) for unit in units} == {mine}
        assert set(re.findall(r"\[(\w+/\w+)\] trained by (\d+)@", text)) == {(unit, mine) for unit in units}
        assert "waiting for it" not in text
        assert set(re.findall(r"is being trained by (\d+)@", text)) <= {other}
        held = re.findall(r"\[(\w+/\w+)\] is being trained by", text)
        assert all(trainer(out, unit) == other for unit in held)


def held_and_stale(tmp_path_factory, tiny_root, monkeypatch, name, jobs):
    """fold_0 held by a live process elsewhere (finished once this process has trained fold_2), fold_1 by a dead
    one (old heartbeat), fold_2 free; run_units over the three: (config, the pipeline's log lines)."""
    import stages.training.record as record
    import stages.training.schedule as schedule
    from stages.training.runs import stage_runs
    from utils.helpers import logger, run_dir
    cfg = replace(prepared_output(tmp_path_factory, tiny_root, name, n_folds=3), epochs=1, jobs=jobs)
    monkeypatch.setattr(schedule, "WAIT_S", 0.1)
    spec = stage_runs(cfg, "cv")[0]
    live, dead, free = (run_dir(cfg, spec.name, f"fold_{k}") for k in range(3))
    write_lock(live, pid=1, host="elsewhere", started="now")
    write_lock(dead, pid=2, host="gone", started="2020-01-01T00:00:00")
    then = time.time() - cfg.lock_stale_s - 60
    os.utime(dead / ".lock", (then, then))
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    live_digest = record.digest(record.expected(cfg, spec, "fold_0"))
    elsewhere = threading.Thread(target=finish_elsewhere, args=(live, free, live_digest), daemon=True)
    elsewhere.start()
    try:
        schedule.run_units(cfg, [(spec, f"fold_{k}") for k in range(3)])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    elsewhere.join(timeout=10)
    out = Path(cfg.output_dir)
    assert json.loads((live / "metrics.json").read_text())["marker"] == "trained elsewhere"
    assert not list(out.glob("runs/*/*/.lock"))
    return out, "\n".join(messages)


def in_order(text, lines):
    places = [text.find(line) for line in lines]
    return -1 not in places and places == sorted(places)


def test_a_held_run_is_taken_up_after_the_free_ones(tmp_path_factory, tiny_root, monkeypatch):
    out, text = held_and_stale(tmp_path_factory, tiny_root, monkeypatch, "held", jobs=1)
    assert trainer(out, "mmnet/fold_1") == trainer(out, "mmnet/fold_2") == str(os.getpid())
    assert in_order(text, ["[mmnet/fold_0] is being trained by 1@elsewhere", "taking over the stale lock of 2@gone",
                           "[mmnet/fold_1] trained by", "[mmnet/fold_2] trained by",
                           "back to 1 held by other processes: mmnet/fold_0",
                           "[mmnet/fold_0] finished earlier by 1@elsewhere"]), text
    assert "waiting for it" not in text


def test_jobs_take_up_a_held_run_after_the_free_ones(tmp_path_factory, tiny_root, monkeypatch):
    out, text = held_and_stale(tmp_path_factory, tiny_root, monkeypatch, "held_jobs", jobs=2)
    workers = {trainer(out, "mmnet/fold_1"), trainer(out, "mmnet/fold_2")}
    assert str(os.getpid()) not in workers and "1" not in workers
    assert "taking over the stale lock of 2@gone" in (out / "runs" / "mmnet" / "fold_1" / "run.log").read_text()
    assert in_order(text, ["[mmnet/fold_0] is being trained by 1@elsewhere",
                           "back to 1 held by other processes: mmnet/fold_0", "[mmnet/fold_0] TEST patient AUC"]), text
    assert re.search(r"\[mmnet/fold_0\] TEST patient AUC .* \| by 1@elsewhere", text), text
    assert sorted(result_lines(text)) == ["mmnet/fold_0", "mmnet/fold_1", "mmnet/fold_2"]


def finish_elsewhere(live, free, digest, timeout=300):
    """The other host's process: it finishes its run (a copy of the free run's metrics, marked, and of its record
    under the live run's settings digest) once this one has trained the free run."""
    deadline = time.time() + timeout
    while not (free / "metrics.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    metrics = dict(json.loads((free / "metrics.json").read_text()), marker="trained elsewhere")
    record = dict(json.loads((free / "record.json").read_text()), digest=digest, trained_by="1@elsewhere")
    (live / "record.json").write_text(json.dumps(record))
    (live / "metrics.json").write_text(json.dumps(metrics))
    (live / ".lock").unlink()


def test_a_worker_stops_when_its_parent_dies(tmp_path):
    import os
    import time
    pid_file = tmp_path / "child.pid"
    script = (
        "import multiprocessing as mp, os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from stages.training.schedule import exit_with\n"
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
