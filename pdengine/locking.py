"""One writer per output directory: an exclusive `fcntl.flock` lock held for a whole run.

`OUT/.pdengine.lock` holds the owner's pid, host and command. A second process that
tries to write into the same directory gets an InputError naming the holder. The kernel
drops a flock when its process dies (even by SIGKILL), so a lock left by a dead process
is simply taken over; no pid probing is needed. The file itself is never deleted
(deleting it would let two processes lock two different inodes of the same name).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from pdengine.errors import InputError

LOCK_NAME = ".pdengine.lock"


class DirectoryLock:
    """`with DirectoryLock(out):` creates `out` if needed and holds its lock inside."""

    def __init__(self, directory, purpose: str = ""):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose or " ".join(sys.argv[:3])
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"{self.directory} is a file, not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{self.directory} is in use by another pdengine process "
                             f"({_describe(self.path)}); wait for it or use another output directory") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": self.purpose}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(path: Path) -> str:
    """'pid 123 on host, since ..., running ...' from a lock file (best effort)."""
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        owner = {}
    if not owner:
        return "its owner is starting"
    return (f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}, "
            f"running {owner.get('command')!r}")
