"""One process per run directory: ``<run>/.advfast-lock``, created with O_EXCL.

The file holds the owner's pid, host, process start time and a random token. A second process
refuses with one line. A lock left by a dead process on this host (pid gone, or reused by another
process) is taken over with a note; one from another host cannot be checked from here, so it is
reported with its age and the way to break it (``--break-lock``, i.e. ``RunLock(break_lock=True)``,
or deleting the file). The lock is released when training ends, on exceptions and at interpreter
exit; a SIGKILL leaves it behind, and the next run on this host takes it over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path

from advfast.engine.rundir import LOCK_FILE


class RunDirLocked(ValueError):
    """Another process holds the run directory."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux /proc), to tell a reused pid from the owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    now = _start_time(pid)
    return start is None or now is None or now == start


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    def __init__(self, run_dir: Path, *, break_lock: bool = False, note=print):
        self.path = Path(run_dir) / LOCK_FILE
        self.break_lock = break_lock
        self.note = note
        self.token = secrets.token_hex(8)
        self.held = False

    def acquire(self) -> "RunLock":
        """Create the lock or raise RunDirLocked (one line); the run directory must exist."""
        for _ in range(3):
            if self._create():
                return self
            owner = _read(self.path)
            if owner is None:  # released between our attempt and the read: try again
                continue
            if self._stale(owner):
                self._take_over(owner)
                continue
        raise RunDirLocked(f"{self.path.parent} is locked: could not take {self.path} (it keeps changing); retry")

    def _create(self) -> bool:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid_start": _start_time(os.getpid()),
                  "token": self.token}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.held = True
        return True

    def _stale(self, owner: dict) -> bool:
        """True when ``owner`` is dead (same host) or break_lock is set; else raises RunDirLocked."""
        run = self.path.parent
        pid, host = owner.get("pid"), owner.get("host")
        started = owner.get("started")
        age = _age(time.time() - started) if isinstance(started, (int, float)) else "unknown age"
        if self.break_lock:
            self.note(f"advfast: breaking the lock of {run} held by pid {pid} on {host} ({age} old), as asked")
            return True
        if not isinstance(pid, int) or not isinstance(host, str):
            raise RunDirLocked(f"{run} is locked by an unreadable {self.path}; if no run uses it, delete that file "
                               f"or pass --break-lock")
        if host == socket.gethostname():
            if _pid_alive(pid, owner.get("pid_start")):
                who = "this process" if pid == os.getpid() else f"pid {pid}"
                raise RunDirLocked(f"{run} is in use by {who} on this host (since {owner.get('started_at')}, {age}); "
                                   f"wait for it to finish or stop it, or choose another --out")
            self.note(f"advfast: taking over the lock of {run} left by pid {pid}, which is no longer running")
            return True
        raise RunDirLocked(f"{run} is locked by pid {pid} on host {host} (since {owner.get('started_at')}, {age} ago); "
                           f"if that run is gone, pass --break-lock or delete {self.path}")

    def _take_over(self, owner: dict) -> None:
        """Remove the stale lock only if it is still the one judged stale (under a directory flock, so two
        processes taking over at once cannot remove each other's fresh lock)."""
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _read(self.path) == owner:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)  # closing drops the flock

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        owner = _read(self.path)
        if owner and owner.get("token") == self.token:
            try:
                self.path.unlink()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
