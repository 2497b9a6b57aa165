"""Crash consistency of `pdengine prefill`: a real process SIGKILLed at the worst moments
(halfway through an atomic shard write, between a shard and the manifest that records it) resumes to a cache whose tensors are bit-for-bit those
of an uninterrupted run (docs/DESIGN.md, "Prefill" and "Cache format")."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import DOCUMENTS, QA, tiny_model_and_tokenizer
from safetensors.torch import load_file

from pdengine import cli
from pdengine.io import write_jsonl

# Runs `pdengine ARGS` and SIGKILLs itself just before the NTH os.replace onto a file named
# TARGET: the temp file is written and fsynced, the rename that commits it never happens.
KILLER = """
import os, signal, sys
target, nth = sys.argv[1], int(sys.argv[2])
real_replace, calls = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == target:
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from pdengine.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    model, tok = tiny_model_and_tokenizer("qwen2")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_jsonl(root / "docs.jsonl", DOCUMENTS)
    write_jsonl(root / "qa.jsonl", QA)
    return root


def _args(root, out):
    return ["prefill", "--model", str(root / "model"), "--documents", str(root / "docs.jsonl"),
            "--qa", str(root / "qa.jsonl"), "--out", str(out), "--k", "8", "--shard-size", "1",
            "--no-progress", "--device", "cpu"]


def _killed_at(root, out, target: str, nth: int) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, target, str(nth), *_args(root, out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _shards(out) -> list[str]:
    manifest = out / "manifest.json"
    return [s["file"] for s in json.loads(manifest.read_text())["shards"]] if manifest.exists() else []


def test_killed_prefills_resume_to_the_uninterrupted_cache(inputs, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert cli.main(_args(inputs, reference)) == 0

    _killed_at(inputs, out, "shard-00001.safetensors", 1)  # dies inside shard 1's write
    assert _shards(out) == ["shard-00000.safetensors"]
    assert [p.name for p in out.glob(".shard-00001.safetensors.*.tmp")], "a half-committed write is left"

    _killed_at(inputs, out, "manifest.json", 3)  # resumes at shard 1; shard 3 lands, its manifest does not
    assert (out / "shard-00003.safetensors").exists() and len(_shards(out)) == 3

    assert cli.main(_args(inputs, out)) == 0  # the dead process's lock is taken over
    expected = json.loads((reference / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert got["complete"] and got["shards"] == expected["shards"]  # same files, sizes and sha256
    for entry in expected["shards"]:
        want, have = load_file(reference / entry["file"]), load_file(out / entry["file"])
        assert want.keys() == have.keys()
        assert all(torch.equal(want[name], have[name]) for name in want), entry["file"]
    assert not list(out.glob(".*.tmp"))
