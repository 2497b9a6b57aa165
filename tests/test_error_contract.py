"""One error contract for every command: bad input is one line on stderr and exit 2
(PDENGINE_DEBUG=1: the traceback); an internal bug keeps its traceback; the demo prints
no errors of its own."""
import os
import pickle
import sys

import pytest
import torch
from helpers import QA, save_tiny

from pdengine import cli
from pdengine.errors import InputError
from pdengine.io import read_jsonl, write_jsonl


def _prefill_args(model, tmp_path, docs="docs.jsonl"):
    return ["prefill", "--model", str(model), "--documents", str(tmp_path / docs), "--qa", str(tmp_path / "qa.jsonl"),
            "--out", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert "error" not in captured.out
    return err[0]


def test_non_utf8_input_names_file_and_line(model_dir, tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    write_jsonl(tmp_path / "qa.jsonl", QA)
    assert cli.main(_prefill_args(model_dir, tmp_path)) == 2
    assert _one_line(capsys) == (f"pdengine prefill: error: {tmp_path / 'docs.jsonl'}:2: not UTF-8 text "
                                 f"(byte 0xe9 at column 25); save the file as UTF-8")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "docs.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "x"}\n')
    assert read_jsonl(tmp_path / "docs.jsonl") == [{"id": "a", "text": "x"}]


class _Payload:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))  # would create the flag file when unpickled


def test_a_pickled_model_is_refused_in_one_line_and_never_run(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    evil = tmp_path / "evil"
    save_tiny(evil)
    capsys.readouterr()  # save_pretrained's own progress bar
    weights = load_file(evil / "model.safetensors")
    (evil / "model.safetensors").unlink()
    flag = tmp_path / "PAYLOAD_RAN"
    torch.save({**weights, "x": _Payload(str(flag))}, evil / "pytorch_model.bin")
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "ada", "text": "Ada lives in Oslo ."}])
    write_jsonl(tmp_path / "qa.jsonl", QA[:1])
    assert cli.main(_prefill_args(evil, tmp_path)) == 2
    line = _one_line(capsys)
    assert line.startswith(f"pdengine prefill: error: {evil}: the pickled weights (pytorch_model.bin)")
    assert "weights_only=True" in line
    assert not flag.exists()


def test_debug_shows_the_traceback_of_bad_input(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PDENGINE_DEBUG", "1")
    with pytest.raises(InputError, match="file not found"):
        cli.main(_prefill_args(model_dir, tmp_path, docs="missing.jsonl"))


def test_an_internal_bug_is_not_reported_as_bad_input(model_dir, tmp_path, monkeypatch):
    import pdengine.prefill

    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(pdengine.prefill, "run", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(_prefill_args(model_dir, tmp_path))
    monkeypatch.setattr(pdengine.prefill, "run", lambda args: {}["key"])
    with pytest.raises(KeyError):
        cli.main(_prefill_args(model_dir, tmp_path))


def test_a_failed_demo_gate_is_one_line_on_stderr_and_exit_1(tmp_path, monkeypatch, capsys):
    import pdengine.demo.pipeline as demo_pipeline
    from pdengine.demo.pretrain import GateFailed

    def gate_fails(*args, **kwargs):
        raise GateFailed("gate failed: the base model's open-book reading accuracy 0.500 < 0.95")

    monkeypatch.setattr(demo_pipeline, "run_demo", gate_fails)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--fast"]) == 1
    assert _one_line(capsys) == "pdengine demo: error: gate failed: the base model's open-book reading accuracy " \
                                "0.500 < 0.95"
    assert isinstance(GateFailed("x"), RuntimeError)  # callers that caught RuntimeError still do


def test_bad_demo_settings_are_input_errors(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--documents", "99"]) == 2
    assert "n_documents must be in 1..30" in _one_line(capsys)


def test_truncated_model_weights_are_one_line(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "ada", "text": "Ada lives in Oslo ."}])
    write_jsonl(tmp_path / "qa.jsonl", QA[:1])
    capsys.readouterr()
    assert cli.main(_prefill_args(model, tmp_path)) == 2
    assert "unreadable safetensors weights" in _one_line(capsys)
