"""One writer per run folder: folder/.lock created with O_CREAT | O_EXCL, holding pid, host and start time; its mtime
is a heartbeat a background thread refreshes while the lock is held."""
import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from config import Config
from utils.helpers import PipelineError, log, read_json_or_none, warn

DAMAGED_AFTER_S = 60
STALE_AFTER_S = Config.lock_stale_s
BEATS_PER_STALE = 10


def create_exclusive(path, info):
    """Create `path` holding `info` as JSON; False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
    return True


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def age_s(path):
    """Seconds since the file was last written or touched (its heartbeat); 0 when it is gone."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def stale_reason(path, info, stale_s=STALE_AFTER_S):
    """Why a lock may be taken over, or '' while its holder may still be working."""
    if info is None:
        return "a damaged lock file" if path.exists() and age_s(path) > DAMAGED_AFTER_S else ""
    if info.get("host") == socket.gethostname() and not alive(int(info.get("pid", 0))):
        return "that process is gone"
    silent = age_s(path)
    return f"no heartbeat for {silent:.0f} s, over {stale_s:g} s" if silent > stale_s else ""


def owner(info):
    """pid@host of a lock's holder."""
    return f"{info.get('pid')}@{info.get('host')}" if info else "an unknown process"


def describe(info, path=None):
    if not info:
        return "an unreadable lock"
    beat = f", heartbeat {age_s(path):.0f} s ago" if path is not None else ""
    return f"{owner(info)} (since {info.get('started')}{beat})"


def me():
    return f"{os.getpid()}@{socket.gethostname()}"


class RunLock:
    """Context manager holding folder/.lock; a stale lock (dead pid on this host, or no heartbeat for `stale_s`
    seconds on any host) is taken over, a live one refused."""

    def __init__(self, folder, stale_s=STALE_AFTER_S):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.stale_s = stale_s
        self.info = dict(pid=os.getpid(), host=socket.gethostname(),
                         started=datetime.now().isoformat(timespec="seconds"), token=secrets.token_hex(8))
        self.held = False
        self.stop = threading.Event()

    def held_by(self):
        """The holder's pid, host and start time as written in the lock, or None when there is no lock."""
        return read_json_or_none(self.path)

    def acquire(self):
        """True when this process now holds the lock (and beats its heartbeat)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.held = create_exclusive(self.path, self.info) or self.take_over()
        if self.held:
            self.stop.clear()
            threading.Thread(target=self.beat, daemon=True, name=f"heartbeat {self.path}").start()
        return self.held

    def beat(self):
        """Touch the lock every stale_s / BEATS_PER_STALE seconds while it is ours."""
        while not self.stop.wait(self.stale_s / BEATS_PER_STALE):
            if self.held_by() != self.info:
                warn(f"{self.path} was taken over by {describe(self.held_by())}; two processes may now write "
                     f"{self.folder}. Raise --lock-stale-s if runs pause longer than {self.stale_s:g} s.")
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def take_over(self):
        """Replace a stale lock; a guard file keeps two processes from taking over the same one."""
        holder = self.held_by()
        reason = stale_reason(self.path, holder, self.stale_s)
        if not reason:
            return False
        guard = self.path.with_name(f"{self.path.name}.takeover")
        if not create_exclusive(guard, self.info):
            clear_dead_guard(guard, self.stale_s)
            return False
        try:
            if self.held_by() != holder:
                return False
            log(f"{self.path}: taking over the stale lock of {describe(holder)} ({reason})")
            self.path.unlink(missing_ok=True)
            return create_exclusive(self.path, self.info)
        finally:
            guard.unlink(missing_ok=True)

    def release(self):
        self.stop.set()
        if self.held and self.held_by() == self.info:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        if self.held or self.acquire():
            return self
        raise PipelineError(f"{self.folder} is in use by {describe(self.held_by(), self.path)}. Wait for that run to "
                            f"end, or delete {self.path} if no such process is running.")

    def __exit__(self, *exc):
        self.release()
        return False


def clear_dead_guard(guard, stale_s=STALE_AFTER_S):
    """Remove a takeover guard left by a process killed while holding it."""
    info = read_json_or_none(guard)
    if stale_reason(guard, info, min(stale_s, DAMAGED_AFTER_S)):
        guard.unlink(missing_ok=True)


def try_lock(folder, stale_s=STALE_AFTER_S):
    """A held RunLock for `folder`, or None when a live process holds it (see RunLock(folder).held_by())."""
    lock = RunLock(folder, stale_s)
    return lock if lock.acquire() else None


class FileLock(RunLock):
    """A RunLock held in a lock file of its own (beside a cache file) instead of folder/.lock."""

    def __init__(self, path, stale_s=STALE_AFTER_S):
        super().__init__(Path(path).parent, stale_s)
        self.path = Path(path)


@contextmanager
def file_lock(path, what, stale_s=STALE_AFTER_S, wait_s=1.0):
    """Hold the lock file at `path` while doing `what`; while another live process holds it, wait (saying so once)."""
    lock = FileLock(path, stale_s)
    if not lock.acquire():
        log(f"waiting for {describe(lock.held_by(), lock.path)}, who is building {what}")
        while not lock.acquire():
            time.sleep(wait_s)
    try:
        yield lock
    finally:
        lock.release()
