"""Content digests of a pipeline's input files, each large file hashed once.

`pdengine run` fingerprints what its stages read, not where it lies: a file's digest is
its size and a streamed sha256 of its bytes; a directory's is the digest of every regular
file in it (hidden names skipped: lock files, editor and hub caches). Hashing a
multi-gigabyte model on every run would cost more than it saves, so each digest is
remembered in a small JSON file keyed by the file's resolved path, size and mtime: a file
whose size or mtime changed is hashed again, one that was only touched keeps its digest
(its bytes are unchanged, so the fingerprint is too).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pdengine.io import atomic_write_json

_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class InputHashes:
    """`digest(path)` of files and directories, remembered in `memo_path` (see `save`)."""

    def __init__(self, memo_path):
        self.memo_path = Path(memo_path)
        self.hashed: list[str] = []  # files actually read this time (for tests and logs)
        self._memo = self._load()

    def _load(self) -> dict:
        try:
            memo = json.loads(self.memo_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or unreadable: hashing again is always safe
            return {}
        return memo if isinstance(memo, dict) else {}

    def save(self) -> None:
        atomic_write_json(self.memo_path, self._memo)

    def digest(self, path) -> dict | str:
        """{"size", "sha256"} of a file, {name: file digest} of a directory, "missing"."""
        path = Path(path)
        if path.is_file():
            return self._file(path)
        if path.is_dir():
            return {str(f.relative_to(path)): self._file(f) for f in _visible_files(path)}
        return "missing"

    def _file(self, path: Path) -> dict:
        stat = path.stat()
        key = str(path.resolve())
        known = self._memo.get(key)
        if isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
            return {"size": stat.st_size, "sha256": known.get("sha256")}
        digest = sha256_of(path)
        self.hashed.append(key)
        self._memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        return {"size": stat.st_size, "sha256": digest}


def _visible_files(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".") and (Path(root) / n).is_file()]
    return files
