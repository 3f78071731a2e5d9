"""Exclusive use of a folder for as long as a run (or an analysis driver) writes into it.

``DIR/.lss-megatron.lock`` is a lock file held with ``fcntl.flock(LOCK_EX)`` from the moment a run
takes the folder until it ends. The kernel drops a flock with the process that holds it (SIGKILL
and power loss of a client included), so a lock can never outlive its holder; what can remain is
the file, naming a holder that is gone, which the next run takes over and reports.

* `acquire(folder, flag)`: take the folder, or raise `FolderInUse` naming the holder (pid, host,
  start time, program), one line. Returns a `Lock` whose ``stale`` field is the dead holder's
  record when a lock file was taken over.
* `holder(folder)`: read-only probe (nothing is created): the holder's record when a live process
  holds the folder, else None. Used up front by `runs.plan`, before any process group.
* `release_all()`: drop every lock this process holds (also at interpreter exit).

On a shared file system (clusters) flock is carried by the file system's own locking (NFS emulates
it with byte-range locks); the holder's host is named so a user can tell where it runs.
Import-light: no torch.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".lss-megatron.lock"
_RETRY_S = 1.0
"""How long `acquire` retries a lock whose holder has not written its record yet."""


class FolderInUse(RuntimeError):
    """The folder is held by another live process; the message names it (one line)."""


@dataclass
class Lock:
    path: Path
    fd: int
    stale: dict | None = None
    """The record of a holder that died without releasing (its lock file taken over), or None."""

    def release(self) -> None:
        if self.fd < 0:
            return
        try:  # unlink first, while still holding: a waiting run then creates a fresh file
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


_HELD: dict[str, Lock] = {}


def _key(folder: Path) -> str:
    return str(Path(folder).expanduser().resolve())


def describe(record: dict | None) -> str:
    """``pid 123 on host, started 2026-12-06T07:00:00 (lss_megatron.train)``."""
    if not record:
        return "a process that has not written its record yet"
    what = f" ({record['program']})" if record.get("program") else ""
    return (
        f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started "
        f"{record.get('started', '?')}{what}"
    )


def _read(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive_here(record: dict) -> bool | None:
    """Whether the record's process runs (None: on another host, unknown)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return None
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(folder: str | Path) -> dict | None:
    """The record of the live process holding `folder`, or None (free, missing, or held by this
    process). Read-only."""
    folder = Path(folder).expanduser()
    if _key(folder) in _HELD:
        return None
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        except OSError:
            return None  # a file system without locks: nothing to learn here
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def acquire(folder: str | Path, flag: str, program: str | None = None) -> Lock:
    """Hold `folder` (created if needed) for this process; raises `FolderInUse` when a live
    process holds it. Taking it twice in one process returns the same lock."""
    folder = Path(folder).expanduser()
    key = _key(folder)
    if key in _HELD:
        return _HELD[key]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    deadline = time.monotonic() + _RETRY_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read(fd)
            os.close(fd)
            # a holder that has just started (no record yet), or a read-only probe: retry briefly
            if (not record or _alive_here(record) is False) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise FolderInUse(
                f"{flag} {folder} is in use by another run: {describe(record)}; wait for it "
                f"to end or choose another {flag}"
            ) from None
        try:  # the file locked must still be the one at `path` (a releasing holder unlinks it)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read(fd)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "program": program or Path(sys.argv[0]).name,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        lock = _HELD[key] = Lock(path, fd, stale=previous)
        return lock


def release(folder: str | Path) -> None:
    lock = _HELD.pop(_key(folder), None)
    if lock is not None:
        lock.release()


def release_all() -> None:
    while _HELD:
        _HELD.popitem()[1].release()


atexit.register(release_all)
