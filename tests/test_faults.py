import errno
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
from tests.conftest import ROOT, TEST_SETTINGS

import utils.helpers
from utils.helpers import read_json, read_json_or_none, write_bytes, write_csv, write_json, write_text

WRITERS = {
    "json": (lambda p: write_json(p, {"a": 1}), lambda p: write_json(p, {"a": 2, "b": [1, 2]})),
    "text": (lambda p: write_text(p, "old\n"), lambda p: write_text(p, "new\n" * 1000)),
    "csv": (lambda p: write_csv(pd.DataFrame({"x": [1]}), p, index=False),
            lambda p: write_csv(pd.DataFrame({"x": range(1000)}), p, index=False)),
    "bytes": (lambda p: write_bytes(p, b"old"), lambda p: write_bytes(p, b"new" * 1000)),
}


def disk_full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("kind", list(WRITERS))
def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch, kind):
    path = tmp_path / "out" / f"file.{kind}"
    first, second = WRITERS[kind]
    first(path)
    old = path.read_bytes()
    monkeypatch.setattr(utils.helpers.os, "fsync", disk_full)
    with pytest.raises(OSError):
        second(path)
    assert path.read_bytes() == old
    assert os.listdir(path.parent) == [path.name]


@pytest.mark.parametrize("kind", list(WRITERS))
def test_write_replaces_file(tmp_path, kind):
    path = tmp_path / f"file.{kind}"
    first, second = WRITERS[kind]
    first(path)
    old = path.read_bytes()
    second(path)
    assert path.read_bytes() != old
    assert os.listdir(tmp_path) == [path.name]


def test_written_file_keeps_default_permissions(tmp_path):
    write_json(tmp_path / "a.json", {})
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode


def test_read_json_or_none(tmp_path):
    path = tmp_path / "metrics.json"
    assert read_json_or_none(path) is None
    write_json(path, {"auc": 0.5})
    assert read_json_or_none(path) == read_json(path) == {"auc": 0.5}
    path.write_text('{"auc": 0.')
    assert read_json_or_none(path) is None


def as_flags(settings):
    flags = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1))
            continue
        flags += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return flags


def test_killed_runs_resume_to_identical_metrics(tmp_path, tiny_root):
    """Two SIGKILLs at seeded random moments of a tiny cv run; each resumed run must match the uninterrupted one."""
    flags = as_flags(dict(TEST_SETTINGS, n_folds=3, folds=(0,)))
    cmd = [sys.executable, str(ROOT / "tests" / "benchmarks" / "bench_faults.py"), "--kills", "2", "--seed", "0",
           "--work", str(tmp_path / "work"), "--data-root", str(tiny_root), "--", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = re.fullmatch(r"faults: (\d+) kills, (\d+) survived identical, (\d+) lost", lines[-1])
    assert found, lines[-1]
    kills, survived, lost = map(int, found.groups())
    assert kills >= 1 and kills == survived + lost
    assert lost == 0, "\n".join(lines)


def test_bench_compares_every_number_but_wall_times():
    from tests.benchmarks.bench_faults import differences, leaves
    ref = {"mmnet/fold_0": leaves({"test": {"auc": 0.75, "f1": float("nan")}, "train_seconds": 3.0, "epochs": 4})}
    same = {"mmnet/fold_0": leaves({"test": {"auc": 0.75, "f1": float("nan")}, "train_seconds": 9.0, "epochs": 4})}
    assert differences(ref, same) == []
    changed = {"mmnet/fold_0": leaves({"test": {"auc": 0.76, "f1": float("nan")}, "epochs": 4})}
    assert "test.auc" in differences(ref, changed)[0]
    assert "missing" in differences(ref, {})[0]
    assert "unreadable" in differences(ref, {"mmnet/fold_0": None})[0]
