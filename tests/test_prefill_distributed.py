"""Prefill under torchrun (2 gloo processes, started with torchrun's env variables): the cache is
bit-identical to a one-process prefill, and a killed 2-rank prefill resumes with 1 or 2 ranks."""
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from helpers import DOCUMENTS, QA, end_rank, free_port, tiny_model_and_tokenizer
from safetensors.torch import load_file

from pdengine import prefill_distributed
from pdengine.cache_format import read_manifest
from pdengine.prefill import prefill

SETTINGS = dict(k=8, shard_size=1, progress=False)  # five shards, so both ranks get several


def _rank(rank, world, port, out, crash_rank):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank == crash_rank:  # killed right after finishing its first shard
        real = prefill_distributed.write_entry

        def write_then_die(*args):
            real(*args)
            os._exit(9)
        prefill_distributed.write_entry = write_then_die
    model, tok = tiny_model_and_tokenizer("llama")
    prefill(model, tok, DOCUMENTS, QA, out, **SETTINGS)
    end_rank()


def launch(out, world=2, crash_rank=-1):
    mp.spawn(_rank, args=(world, free_port(), str(out), crash_rank), nprocs=world, join=True)


def shards(directory: Path) -> list[dict]:
    manifest = read_manifest(directory)
    assert manifest["complete"]
    return [load_file(directory / entry["file"]) for entry in manifest["shards"]]


def assert_same_cache(a: Path, b: Path):
    for x, y in zip(shards(a), shards(b), strict=True):
        assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "cache"
    model, tok = tiny_model_and_tokenizer("llama")
    prefill(model, tok, DOCUMENTS, QA, out, **SETTINGS)
    return out


def test_two_ranks_continue_a_one_process_cache_and_write_its_bytes(one_process, tmp_path, monkeypatch):
    """A one-process prefill killed after two shards, resumed by two ranks (a different N)."""
    out = tmp_path / "cache"
    real, written = prefill_distributed.cache_format.write_manifest, []

    def die_after_two(directory, manifest):
        real(directory, manifest)
        written.append(1)
        if len(written) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(prefill_distributed.cache_format, "write_manifest", die_after_two)
    model, tok = tiny_model_and_tokenizer("llama")
    with pytest.raises(KeyboardInterrupt):
        prefill(model, tok, DOCUMENTS, QA, out, **SETTINGS)
    monkeypatch.undo()
    assert len(read_manifest(out)["shards"]) == 2
    launch(out)
    assert_same_cache(one_process, out)
    assert not list(out.glob("*.entry.json"))  # one manifest, no leftovers


def test_killed_two_rank_prefill_resumes_in_one_process(one_process, tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(Exception):
        launch(out, crash_rank=1)
    assert list(out.glob("*.entry.json"))  # finished shards were left for the resume
    model, tok = tiny_model_and_tokenizer("llama")
    prefill(model, tok, DOCUMENTS, QA, out, **SETTINGS)
    assert_same_cache(one_process, out)
    assert not list(out.glob("*.entry.json"))
