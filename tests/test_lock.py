import json
import multiprocessing
import time
import os
import signal
import socket
import subprocess
from pathlib import Path

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
        with pytest.raises(PipelineError, match=f"{os.getpid()}@{socket.gethostname()}"), RunLock(tmp_path):
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


def make_old(folder, seconds):
    then = time.time() - seconds
    os.utime(folder / ".lock", (then, then))


def test_dead_other_host_lock_is_taken_over_once_its_heartbeat_is_old(tmp_path, monkeypatch):
    write_lock(tmp_path, pid=dead_pid(), host="another-" + socket.gethostname(), started="2020-01-01T00:00:00")
    make_old(tmp_path, utils.lock.STALE_AFTER_S - 30)
    assert try_lock(tmp_path) is None
    make_old(tmp_path, utils.lock.STALE_AFTER_S + 30)
    messages = []
    monkeypatch.setattr(utils.lock, "log", messages.append)
    lock = try_lock(tmp_path)
    assert lock is not None and lock.held_by()["host"] == socket.gethostname()
    assert len(messages) == 1 and "another-" in messages[0] and "no heartbeat" in messages[0]
    lock.release()


def test_stale_time_is_a_setting(tmp_path):
    write_lock(tmp_path, pid=1, host="elsewhere", started="now")
    make_old(tmp_path, 120)
    assert try_lock(tmp_path) is None
    assert try_lock(tmp_path, stale_s=60) is not None


def test_silent_lock_of_a_live_process_on_this_host_is_taken_over(tmp_path):
    write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), started="now", token="frozen")
    make_old(tmp_path, utils.lock.STALE_AFTER_S + 1)
    assert try_lock(tmp_path) is not None


def test_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    with RunLock(tmp_path, stale_s=0.5):
        make_old(tmp_path, 100)
        time.sleep(1.0)
        assert utils.lock.age_s(tmp_path / ".lock") < 0.5
        assert try_lock(tmp_path, stale_s=0.5) is None
    assert not (tmp_path / ".lock").exists()


def test_heartbeat_stops_with_the_lock(tmp_path):
    lock = try_lock(tmp_path, stale_s=0.2)
    lock.release()
    write_lock(tmp_path, pid=1, host="elsewhere", started="now")
    make_old(tmp_path, 100)
    time.sleep(0.3)
    assert utils.lock.age_s(tmp_path / ".lock") > 50


def test_holder_warns_when_its_lock_is_taken_over(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(utils.lock, "warn", warnings.append)
    lock = try_lock(tmp_path, stale_s=0.2)
    write_lock(tmp_path, pid=1, host="elsewhere", started="now", token="other")
    time.sleep(0.3)
    assert len(warnings) == 1 and "1@elsewhere" in warnings[0]
    make_old(tmp_path, 100)
    time.sleep(0.1)
    assert utils.lock.age_s(tmp_path / ".lock") > 50
    lock.release()
    assert (tmp_path / ".lock").exists()


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


def cache_in_child(paths, folder, start, results):
    from preprocess.cache import image_cache
    start.wait()
    arr, target, _ = image_cache(paths, (16, 24), False, folder)
    results.put((str(target), int(arr.sum())))


def test_two_processes_on_one_empty_cache_write_it_once(tmp_path, monkeypatch):
    from preprocess import cache
    from tests.conftest import SAMPLES
    paths = [str(p) for p in sorted(SAMPLES.glob("*.png"))[:4]]
    real, builds = cache.build_cache, tmp_path / "builds.txt"

    def slow_build(*args):
        with open(builds, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        real(*args)

    monkeypatch.setattr(cache, "build_cache", slow_build)
    start, results = FORK.Barrier(2), FORK.Queue()
    procs = [FORK.Process(target=cache_in_child, args=(paths, tmp_path / "cache", start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(2)]
    for p in procs:
        p.join(timeout=30)
    assert len(builds.read_text().splitlines()) == 1
    assert got[0] == got[1] and got[0][1] > 0
    assert [p.name for p in (tmp_path / "cache").glob("*.npy")] == [Path(got[0][0]).name]
