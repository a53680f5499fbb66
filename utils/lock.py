"""One writer per run folder: folder/.lock created with O_CREAT | O_EXCL, holding pid, host and start time."""
import json
import os
import secrets
import socket
import time
from datetime import datetime
from pathlib import Path

from utils.helpers import PipelineError, log, read_json_or_none

DAMAGED_AFTER_S = 60


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
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def is_stale(path, info):
    """A lock of a dead process on this host, or a damaged lock file old enough not to be mid-write."""
    if info is None:
        return path.exists() and age_s(path) > DAMAGED_AFTER_S
    return info.get("host") == socket.gethostname() and not alive(int(info.get("pid", 0)))


def describe(info):
    if not info:
        return "an unreadable lock"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"


class RunLock:
    """Context manager holding folder/.lock; a stale lock (dead pid on this host) is taken over, a live one refused."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.info = dict(pid=os.getpid(), host=socket.gethostname(),
                         started=datetime.now().isoformat(timespec="seconds"), token=secrets.token_hex(8))
        self.held = False

    def held_by(self):
        """The holder's pid, host and start time as written in the lock, or None when there is no lock."""
        return read_json_or_none(self.path)

    def acquire(self):
        """True when this process now holds the lock."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.held = create_exclusive(self.path, self.info) or self.take_over()
        return self.held

    def take_over(self):
        """Replace a stale lock; a guard file keeps two processes from taking over the same one."""
        owner = self.held_by()
        if not is_stale(self.path, owner):
            return False
        guard = self.path.with_name(".lock.takeover")
        if not create_exclusive(guard, self.info):
            clear_dead_guard(guard)
            return False
        try:
            if self.held_by() != owner:
                return False
            log(f"{self.path}: taking over the stale lock of {describe(owner)} (that process is gone)")
            self.path.unlink(missing_ok=True)
            return create_exclusive(self.path, self.info)
        finally:
            guard.unlink(missing_ok=True)

    def release(self):
        if self.held and self.held_by() == self.info:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        if self.held or self.acquire():
            return self
        raise PipelineError(f"{self.folder} is in use by {describe(self.held_by())}. Wait for that run to end, or "
                            f"delete {self.path} if no such process is running.")

    def __exit__(self, *exc):
        self.release()
        return False


def clear_dead_guard(guard):
    """Remove a takeover guard left by a process killed while holding it."""
    info = read_json_or_none(guard)
    if is_stale(guard, info):
        guard.unlink(missing_ok=True)


def try_lock(folder):
    """A held RunLock for `folder`, or None when a live process holds it (see RunLock(folder).held_by())."""
    lock = RunLock(folder)
    return lock if lock.acquire() else None
