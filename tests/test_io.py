"""pdengine.io: JSONL reading with errors that name the file and line, atomic writes."""
import json

import pytest

from pdengine import io


def test_read_jsonl_round_trip_and_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "ünïcode"}]
    io.write_jsonl(path, rows)
    path.write_text(path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert io.read_jsonl(path, required=("id", "text")) == rows


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        io.read_jsonl(bad)
    bad.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object, got list"):
        io.read_jsonl(bad)
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key\(s\) \['text'\]"):
        io.read_jsonl(bad, required=("id", "text"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        io.read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="not found"):
        io.read_jsonl(tmp_path / "missing.jsonl")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    io.atomic_write_json(tmp_path / "sub" / "m.json", {"b": 2, "a": 1})
    assert json.loads((tmp_path / "sub" / "m.json").read_text()) == {"a": 1, "b": 2}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    io.atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        io.atomic_write_bytes(path, "not bytes")  # fails inside the write: the temp file goes
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
