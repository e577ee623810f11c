"""One writer at a time: a lock file beside what is being written, naming its holder.

``.<name>.lock`` next to the target (a folder or file) holds the holder's host, pid, the pid's start
time and what it is doing. It is written under a temp name and hard-linked to its name, which fails
when the lock exists, so it appears with its content in one step; this works across hosts on a shared
volume (where there are no hard links: O_EXCL create, then write). A lock whose holder is on this host and no longer runs (the pid is gone, or was reused
by a process started later) is stale and taken over; a lock held from another host is never taken
over (this host cannot see that process), the refusal names the holder and the file to delete.

Taking over a stale lock is serialised by a host-local ``flock`` on the lock's folder, so two processes
of this host that find the same stale lock cannot both take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sae_core.config import ReasonedError

POLL_SECONDS = 0.2
# Lock files this process holds -> how many FileLock objects hold each (the lock is re-entrant).
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()
# A lock file still empty after this long lost its writer between create and write (only possible
# where the file system has no hard links).
UNWRITTEN_STALE_SECONDS = 5.0


class LockError(ReasonedError):
    """Another live process holds the lock (``reason`` "locked"); the message names it and the lock file."""


@dataclass(kw_only=True, frozen=True)
class LockHolder:
    """Who holds a lock, as written in the lock file."""

    host: str
    """Host name of the holder."""
    pid: int
    """Process id of the holder on that host."""
    start: str | None = None
    """The pid's start time (``/proc/<pid>/stat`` field 22), so a reused pid is not taken for the holder."""
    purpose: str = ""
    """What the holder is doing, for the refusal message."""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}" + (f" ({self.purpose})" if self.purpose else "")


def lock_path(target: str | Path) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` in the same folder (outside the target, so a folder
    that is renamed into place keeps its lock)."""
    target = Path(target).resolve()
    return target.parent / f".{target.name}.lock"


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux); None when unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return stat[stat.rindex(")") + 2 :].split()[19]


def _alive(holder: LockHolder, lock_file: Path) -> bool:
    """Whether the holder (on this host) still runs."""
    if holder.pid <= 0:
        try:
            return time.time() - lock_file.stat().st_mtime < UNWRITTEN_STALE_SECONDS
        except FileNotFoundError:
            return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    if holder.start is None:
        return True
    now = _process_start(holder.pid)
    return now is None or now == holder.start


def read_holder(path: str | Path) -> LockHolder | None:
    """The holder recorded in lock file ``path``; None when there is no lock. A lock file that cannot be
    parsed (being written, or its writer died between create and write) reads as pid 0 on this host."""
    try:
        raw = json.loads(Path(path).read_text() or "{}")
        return LockHolder(host=str(raw["host"]), pid=int(raw["pid"]), start=raw.get("start"),
                          purpose=str(raw.get("purpose", "")))
    except FileNotFoundError:
        return None
    except PermissionError:
        return LockHolder(host="another user's process", pid=0, purpose="lock file not readable")
    except (ValueError, KeyError, TypeError):
        return LockHolder(host=socket.gethostname(), pid=0, purpose="lock file not written yet")


class FileLock:
    """An exclusive lock on ``target`` for one writer. Use as a context manager, or acquire/release.

    ``timeout`` is how long :meth:`acquire` waits for a live holder (0: refuse at once)."""

    def __init__(self, target: str | Path, *, purpose: str = "", timeout: float = 0.0):
        self.target = Path(target)
        self.path = lock_path(target)
        self.purpose = purpose
        self.timeout = timeout
        self.held = False

    def _me(self) -> LockHolder:
        pid = os.getpid()
        return LockHolder(host=socket.gethostname(), pid=pid, start=_process_start(pid), purpose=self.purpose)

    def _try_create(self) -> bool:
        """Create the lock file with its content in one step: written under a temp name, then hard-linked
        to the lock's name (fails if it exists), so no reader ever sees an empty lock. Where the file
        system has no hard links, O_EXCL create then write."""
        me = self._me()
        record = json.dumps({"host": me.host, "pid": me.pid, "start": me.start, "purpose": me.purpose,
                             "since": time.time()}).encode()
        # The pid in the temp name lets a later writer remove what a killed one left (_remove_dead_temps).
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.name}.{me.pid}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # others may read who holds it (mkstemp's 0600 would hide that)
            os.write(fd, record)
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here
                return self._try_create_exclusive(record)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _try_create_exclusive(self, record: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, record)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over_stale(self) -> LockHolder | None:
        """Remove the lock if its holder is dead on this host; return the live holder otherwise."""
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            holder = read_holder(self.path)
            if holder is None:
                return None
            if holder.host != socket.gethostname() or holder.pid == os.getpid() or _alive(holder, self.path):
                return holder
            self.path.unlink(missing_ok=True)
            return None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock, waiting up to ``timeout`` for a live holder; re-entrant within this process
        (a job holding its output folder's lock may call save_sae, which locks the folder again)."""
        key = str(self.path.absolute())
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key] += 1
                self.held = True
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout
        while not self._try_create():
            holder = self._take_over_stale()
            if holder is None:
                continue
            if time.monotonic() >= deadline:
                raise LockError(f"{self.target} is being written by {holder.describe()} (lock file {self.path})",
                                reason="locked")
            time.sleep(POLL_SECONDS)
        with _HELD_GUARD:
            _HELD[key] = 1
        self.held = True
        self._remove_dead_temps()

    def _remove_dead_temps(self) -> None:
        """Temp files of lock attempts whose process is gone (killed between its two steps)."""
        for tmp in self.path.parent.glob(f"{self.path.name}.*.tmp"):
            pid = tmp.name[len(self.path.name) + 1 :].split(".")[0]
            if pid.isdigit() and not _alive(LockHolder(host="", pid=int(pid)), tmp):
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = str(self.path.absolute())
        with _HELD_GUARD:
            _HELD[key] -= 1
            if _HELD[key]:
                return
            del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(target: str | Path, *, purpose: str = "", timeout: float = 0.0) -> Iterator[FileLock]:
    """``with locked(folder, purpose="training"):`` one writer of ``folder`` at a time."""
    lock = FileLock(target, purpose=purpose, timeout=timeout)
    with lock:
        yield lock

