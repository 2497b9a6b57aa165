"""`pdengine run` under torchrun (2 gloo processes, launched by torchrun): rank 0 owns OUT (lock,
done markers, messages), every rank runs every stage, and the outputs are the one-process ones
(the files byte for byte, the adapter up to float reduction order); a second launch skips the
finished stages and says so once."""
import json
from pathlib import Path

import pytest
import yaml
from helpers import job_inputs, torchrun
from safetensors.torch import load_file

from pdengine import cli
from pdengine.cache_format import read_manifest

DOCS = [{"id": "d1", "text": "Ada lives in Oslo . Ada works as baker ."},
        {"id": "d2", "text": "Bo lives in Rome ."},
        {"id": "d3", "text": "the cat sat on the mat ."}]
EVAL = [{"doc_id": "d1", "question": "where lives Ada ?", "answer": "Oslo"},
        {"doc_id": "d2", "question": "who lives in Rome ?", "answer": "Bo"},
        {"doc_id": "d3", "question": "what sat on the mat ?", "answer": "the cat"}]
STAGES = ["generate", "answer", "prefill", "train", "eval"]


def _config(root: Path, out: Path) -> Path:
    config = {
        "model": str(root / "model"), "documents": str(root / "docs.jsonl"),
        "eval_questions": str(root / "eval.jsonl"), "out": str(out), "device": "cpu",
        "stages": ",".join(STAGES),
        "generate": {"n_questions": 3, "per_call": 2, "max_new_tokens": 16, "batch_size": 2, "progress": False,
                     "require_question_mark": False},
        "answer": {"max_new_tokens": 6, "batch_size": 2, "progress": False},
        "prefill": {"k": 4, "shard_size": 2, "progress": False},
        "train": {"max_steps": 4, "batch_tokens": 64, "lr": 1e-3, "lora_r": 4, "lora_dropout": 0.0,
                  "progress": False, "save_every": 2},
        "eval": {"max_new_tokens": 4, "batch_size": 2, "methods": ["closed_book", "rag"], "progress": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun_run(config: Path):
    return torchrun("-m", "pdengine", "run", "--config", config, timeout=180)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return job_inputs(tmp_path_factory.mktemp("dist-run"), DOCS, EVAL)


def _shards(cache: Path) -> list[dict]:
    return [load_file(cache / entry["file"]) for entry in read_manifest(cache)["shards"]]


def test_two_ranks_run_the_pipeline_of_one_process(root):
    one, two = root / "one", root / "two"
    assert cli.main(["run", "--config", str(_config(root, one))]) == 0
    result = _torchrun_run(_config(root, two))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("questions.jsonl", "qa.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    for a, b in zip(_shards(one / "cache"), _shards(two / "cache"), strict=True):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    losses = [[json.loads(line)["loss"] for line in (d / "train" / "metrics.jsonl").read_text().splitlines()]
              for d in (one, two)]
    assert len(losses[0]) == 4 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(*losses)), losses
    # The adapters agree less tightly than the losses: the tiny model barely needs its document
    # (loss ~1e-6), so many LoRA gradients are ~0 and Adam's g / sqrt(v) turns their float
    # reduction noise into whole steps. tests/test_training_distributed.py holds a run with a
    # real loss to the 1e-5.
    first, second = (load_file(next((d / "train" / "adapter").glob("*.safetensors"))) for d in (one, two))
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] - second[name]).norm() <= 1e-3 * first[name].norm(), name
    assert set(json.loads((two / "eval" / "report.json").read_text())["methods"]) == {
        "base_closed_book", "rag_bm25", "prompt_distillation"}
    assert result.stderr.count("[pdengine run] train: running") == 1  # rank 0 alone speaks

    again = _torchrun_run(_config(root, two))  # every stage done: skipped, said once each
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done already, skipped") == len(STAGES), again.stderr[-3000:]
