import json
import multiprocessing
import os
import signal
import socket
import subprocess

import pytest

import utils.lock
from utils.helpers import PipelineError
from utils.lock import RunLock, try_lock

FORK = multiprocessing.get_context("fork")


def write_lock(folder, **info):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps(info))


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_lock_written_and_released(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        info = json.loads((tmp_path / "run" / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        assert lock.held_by() == info
    assert not (tmp_path / "run" / ".lock").exists()


def test_released_on_exception(tmp_path):
    with pytest.raises(KeyError), RunLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / ".lock").exists()


def test_second_holder_refused(tmp_path):
    with RunLock(tmp_path):
        assert try_lock(tmp_path) is None
        with pytest.raises(PipelineError, match=f"pid {os.getpid()}"), RunLock(tmp_path):
            pass
    assert (tmp_path / ".lock").exists() is False


def try_and_hold(folder, start, done, results):
    start.wait()
    lock = try_lock(folder)
    results.put(lock is not None)
    done.wait()
    if lock is not None:
        lock.release()


def test_two_processes_cannot_both_hold(tmp_path):
    n = 4
    start, done, results = FORK.Barrier(n), FORK.Barrier(n), FORK.Queue()
    procs = [FORK.Process(target=try_and_hold, args=(tmp_path, start, done, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in range(n)]
    for p in procs:
        p.join(timeout=30)
    assert sorted(got) == [False] * (n - 1) + [True]
    assert not (tmp_path / ".lock").exists()


def hold_forever(folder, ready):
    RunLock(folder).acquire()
    ready.set()
    signal.pause()


def test_lock_of_killed_process_is_taken_over(tmp_path, monkeypatch):
    ready = FORK.Event()
    holder = FORK.Process(target=hold_forever, args=(tmp_path, ready))
    holder.start()
    assert ready.wait(30)
    assert try_lock(tmp_path) is None
    assert RunLock(tmp_path).held_by()["pid"] == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    messages = []
    monkeypatch.setattr(utils.lock, "log", messages.append)
    lock = try_lock(tmp_path)
    assert lock is not None and lock.held_by()["pid"] == os.getpid()
    assert len(messages) == 1 and str(holder.pid) in messages[0]
    lock.release()


def test_stale_lock_of_dead_pid_taken_over(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), host=socket.gethostname(), started="2020-01-01T00:00:00")
    with RunLock(tmp_path) as lock:
        assert lock.held_by()["pid"] == os.getpid()


def test_lock_from_other_host_is_kept(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), host="another-" + socket.gethostname(), started="2020-01-01T00:00:00")
    assert try_lock(tmp_path) is None


def test_damaged_lock_taken_over_only_when_old(tmp_path):
    (tmp_path / ".lock").write_text("")
    assert try_lock(tmp_path) is None
    os.utime(tmp_path / ".lock", (0, 0))
    assert try_lock(tmp_path) is not None


def test_release_keeps_a_lock_that_is_not_ours(tmp_path):
    lock = try_lock(tmp_path)
    write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), started="now", token="other")
    lock.release()
    assert (tmp_path / ".lock").exists()
