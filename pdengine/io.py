"""File I/O shared by every stage: JSONL with clear errors, atomic writes.

Atomic = write a temp file in the same directory, fsync, then os.replace: a killed
process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pdengine.errors import InputError


def read_jsonl(path, required=()) -> list[dict]:
    """Read a JSONL file; every line must be UTF-8 text holding a JSON object with the
    `required` keys.

    Raises InputError naming the file (and line) for a missing or empty file, a line that
    is not UTF-8, a malformed line, a non-object line or a missing key. Blank lines are
    skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    rows = []
    with path.open("rb") as f:  # bytes, so a bad encoding can be reported with its line
        for line_no, raw in enumerate(f, start=1):
            row = _parse_line(path, line_no, raw)
            if row is None:
                continue
            missing = [k for k in required if k not in row]
            if missing:
                raise InputError(f"{path}:{line_no}: missing key(s) {missing}")
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: file is empty")
    return rows


def _parse_line(path: Path, line_no: int, raw: bytes) -> dict | None:
    """The JSON object on one line (None for a blank line)."""
    try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a leading BOM is not an error
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         f"save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
    return row


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path, rows) -> None:
    """Write rows as JSONL, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
