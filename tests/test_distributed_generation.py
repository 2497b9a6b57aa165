"""generate, answer and eval under torchrun (2 gloo processes, launched by torchrun itself):
the files equal a one-process run's byte for byte, and an error on one rank stops both.

The sizes give every stage an odd number of generation batches (batch size 2): generate's
first round 10 prompts (5 batches), answer 15 questions x 2 answers (15 batches), eval 5
questions per method (3 batches), so one rank always computes one batch more.
"""
import json
import re
import time
from pathlib import Path

import pytest
import torch
from helpers import job_inputs, torchrun

from pdengine import cli, distributed, loading
from pdengine.errors import InputError

DOCS = [{"id": "d1", "text": "Ada lives in Oslo . Ada works as baker ."},
        {"id": "d2", "text": "Bo lives in Rome ."},
        {"id": "d3", "text": "the cat sat on the mat ."},
        {"id": "d4", "text": "Bo works as baker in Rome ."},
        {"id": "d5", "text": "Ada sat on a mat in Oslo ."}]
EVAL = [{"doc_id": "d1", "question": "where lives Ada ?", "answer": "Oslo"},
        {"doc_id": "d2", "question": "who lives in Rome ?", "answer": "Bo"},
        {"doc_id": "d3", "question": "what sat on the mat ?", "answer": "the cat"},
        {"doc_id": "d4", "question": "what works Bo as ?", "answer": "baker"},
        {"doc_id": "d5", "question": "where sat Ada ?", "answer": "on a mat"}]
OUTPUTS = ["questions.jsonl", "qa.jsonl", "eval/report.json", "eval/answers.jsonl", "eval/report.md"]

# One torchrun launch (start-up costs seconds): the three stages in one process group, each
# finding the file the previous one wrote on rank 0; then `pdengine generate` as a user runs
# it, with rank 1 failing inside one of its generation batches. (A command run through
# cli.main leaves the process group at its end, and a process joins a group once.)
SCRIPT = """
import argparse, json, os, sys, time
from pdengine import cli, generation
from pdengine.errors import InputError
for command, argv in json.loads(sys.argv[1]):
    parser = argparse.ArgumentParser()
    add_arguments, run = cli.stage_functions(command)
    add_arguments(parser)
    assert run(parser.parse_args(argv)) == 0
print(f"stages done at {time.time()}", file=sys.stderr, flush=True)
if os.environ["RANK"] == "1":
    def fail(*args):
        raise InputError("boom on rank 1")
    generation._generate_batch = fail
sys.exit(cli.main(json.loads(sys.argv[2])))
"""


def stage_argvs(folder: Path, root: Path) -> list[tuple[str, list[str]]]:
    """The three commands writing into `folder`, on the inputs in `root`."""
    common = ["--model", str(root / "model"), "--documents", str(root / "docs.jsonl"), "--no-progress",
              "--batch-size", "2"]
    return [
        ("generate", [*common, "--out", str(folder / "questions.jsonl"), "--n-questions", "3", "--per-call", "2",
                      "--max-new-tokens", "24", "--no-require-question-mark"]),  # sampled, top-up rounds
        ("answer", [*common, "--questions", str(folder / "questions.jsonl"), "--out", str(folder / "qa.jsonl"),
                    "--max-new-tokens", "8", "--n-answers", "2"]),  # sampled
        ("eval", [*common, "--questions", str(root / "eval.jsonl"), "--out", str(folder / "eval"),
                  "--max-new-tokens", "4", "--methods", "closed_book,open_book,rag"]),  # greedy
    ]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return job_inputs(tmp_path_factory.mktemp("dist-gen"), DOCS, EVAL)


def test_two_ranks_write_the_one_process_files_and_an_error_on_one_stops_both(job, tmp_path):
    root = job
    one, two = tmp_path / "one", tmp_path / "two"
    for command, argv in stage_argvs(one, root):
        assert cli.main([command, *argv]) == 0
    (tmp_path / "job.py").write_text(SCRIPT)
    command, argv = stage_argvs(tmp_path / "failing", root)[0]
    result = torchrun(tmp_path / "job.py", json.dumps(stage_argvs(two, root)), json.dumps([command, *argv]))
    log = result.stderr
    assert log.count("stages done") == 2, log[-3000:]
    for name in OUTPUTS:  # report.json holds no clock time; both name the same model
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert len((one / "questions.jsonl").read_text().splitlines()) == 15
    assert len((one / "qa.jsonl").read_text().splitlines()) > 15  # two sampled answers per question
    assert set(json.loads((one / "eval/report.json").read_text())["methods"]) == {
        "base_closed_book", "teacher_open_book", "rag_bm25"}
    # rank 0 alone speaks: one "wrote" line per file, one report line
    assert log.count("wrote 15 questions") == 1 and log.count("report: ") == 1
    # the failing command: both ranks stop (no hang, non-zero exit), one line each, no traceback
    failing_s = time.time() - max(float(x) for x in re.findall(r"stages done at ([0-9.]+)", log))
    assert result.returncode != 0 and failing_s < 30, failing_s  # a hang lasts PDENGINE_DIST_TIMEOUT (60 s)
    errors = sorted(line for line in log.splitlines() if line.startswith("pdengine generate: error:"))
    assert errors == ["pdengine generate: error: boom on rank 1",  # rank 1's own line
                      "pdengine generate: error: rank 1 of 2 stopped: boom on rank 1"], log[-3000:]
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log
    assert not (tmp_path / "failing" / "questions.jsonl").exists()


def test_each_rank_takes_its_own_gpu(monkeypatch):
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context(rank=1, world_size=2, local_rank=1))
    assert loading.pick_device("cuda") == torch.device("cuda", 1)
    assert loading.pick_device("cuda:1") == torch.device("cuda", 1)  # its own index: kept
    with pytest.raises(InputError, match="each rank uses its own GPU"):
        loading.pick_device("cuda:0")  # another rank's GPU
    assert loading.pick_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert loading.pick_device() == expected
