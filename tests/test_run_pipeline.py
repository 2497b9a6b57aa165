"""`pdengine run`: every section checked before the first stage, fingerprints over input
contents (an edited document reruns its stage and every later one), one run per OUT."""
import json
import os

import pytest
import yaml
from helpers import QA_DOCS, error_line, save_tiny

from pdengine import cli, config, pipeline
from pdengine.errors import InputError
from pdengine.input_hashes import InputHashes
from pdengine.io import write_jsonl
from pdengine.locking import DirectoryLock

FAST = dict(generate={"n_questions": 2, "per_call": 2, "max_new_tokens": 12, "batch_size": 4, "progress": False},
            answer={"max_new_tokens": 5, "progress": False})


@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", QA_DOCS)
    return tmp_path


def _config(data, model_dir, **extra):
    base = dict(model=str(model_dir), documents=str(data / "docs.jsonl"), out=str(data / "run"))
    path = data / "run.yaml"
    path.write_text(yaml.safe_dump({**base, **extra}))
    return path


@pytest.mark.parametrize("stage, section, message", [
    ("train", {"lr": float("nan")}, "train: lr must be a finite number"),
    ("eval", {"max_new_tokens": 0}, "eval: max_new_tokens must be > 0"),
    ("prefill", {"temperature": float("inf")}, "prefill: temperature must be a finite number"),
    ("train", {"loss": "pdd"}, "train: loss must be one of"),
])
def test_a_bad_value_in_any_section_stops_the_run_before_the_first_stage(model_dir, data, capsys, stage, section,
                                                                         message):
    write_jsonl(data / "eval.jsonl", [{"doc_id": "d1", "question": "who ?", "answer": "Ada"}])
    cfg = _config(data, model_dir, eval_questions=str(data / "eval.jsonl"), **FAST, **{stage: section})
    assert cli.main(["run", "--config", str(cfg)]) == 2
    assert message in error_line(capsys)
    assert not (data / "run").exists(), "generate must not have run"


def test_the_help_examples_are_valid_sections():
    lines = [line.split("#")[0] for line in cli._RUN_DESCRIPTION.splitlines() if line.startswith("  ")]
    example = yaml.safe_load("\n".join(line[2:] for line in lines))
    for stage in pipeline.PIPELINE:
        config.from_mapping(pipeline.config_class(stage), example[stage], stage)
    assert example["eval"]["methods"] == ["closed_book", "open_book", "rag"]


def test_legacy_switch_keys_still_work():
    prefill_class = pipeline.config_class("prefill")
    assert pipeline._legacy_keys(prefill_class, {"no_progress": True, "k": 4}) == {"progress": False, "k": 4}
    assert pipeline._legacy_keys(prefill_class, {"no-progress": False}) == {"progress": True}


def test_an_edited_document_reruns_its_stage_and_every_later_one(model_dir, data, capsys):
    cfg = _config(data, model_dir, stages="generate,answer", **FAST)
    assert cli.main(["run", "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--config", str(cfg)]) == 0
    assert capsys.readouterr().err.count("done already, skipped") == 2

    stat = (data / "docs.jsonl").stat()
    os.utime(data / "docs.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    assert cli.main(["run", "--config", str(cfg)]) == 0
    assert capsys.readouterr().err.count("done already, skipped") == 2

    edited = [dict(QA_DOCS[0]), QA_DOCS[1]]
    edited[0]["text"] = edited[0]["text"].replace("Oslo", "Rome")  # same length, same path
    write_jsonl(data / "docs.jsonl", edited)
    assert cli.main(["run", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "generate: running" in err and "answer: running" in err and "skipped" not in err


def test_an_edited_model_reruns_everything(model_dir, data, tmp_path_factory, capsys):
    model = save_tiny(tmp_path_factory.mktemp("own") / "model")
    cfg = _config(data, model, stages="generate", **FAST)
    assert cli.main(["run", "--config", str(cfg)]) == 0
    capsys.readouterr()
    config_file = model / "config.json"
    config_file.write_text(config_file.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert cli.main(["run", "--config", str(cfg)]) == 0
    assert "generate: running" in capsys.readouterr().err


def test_input_hashes_hash_a_file_once_until_it_changes(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    memo = tmp_path / "memo.json"
    first = InputHashes(memo)
    digest = first.digest(big)
    first.save()
    assert first.hashed == [str(big.resolve())] and digest["size"] == 3 << 20
    again = InputHashes(memo)
    assert again.digest(big) == digest and again.hashed == []  # remembered, not re-read
    big.write_bytes(b"x" + big.read_bytes()[1:])
    os.utime(big, ns=(0, 12345))
    changed = InputHashes(memo).digest(big)
    assert changed["size"] == digest["size"] and changed["sha256"] != digest["sha256"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "d" / ".pdengine.lock").write_text("123")
    assert list(InputHashes(memo).digest(tmp_path / "d")) == ["a.txt"]
    assert InputHashes(memo).digest(tmp_path / "nope") == "missing"


def test_a_second_run_on_the_same_out_is_refused(model_dir, data, capsys):
    cfg = _config(data, model_dir, stages="generate", **FAST)
    with DirectoryLock(data / "run", "pdengine run (another)"):
        assert cli.main(["run", "--config", str(cfg)]) == 2
        line = error_line(capsys)
    assert "is in use by another pdengine process" in line and f"pid {os.getpid()}" in line
    assert not (data / "run" / "questions.jsonl").exists()


def test_marker_records_the_settings_and_input_digests(model_dir, data):
    cfg = _config(data, model_dir, stages="generate", **FAST)
    assert cli.main(["run", "--config", str(cfg)]) == 0
    done = json.loads((data / "run" / ".pdengine" / "generate.done").read_text())
    assert done["settings"]["n_questions"] == 2
    docs = str(data / "docs.jsonl")
    assert len(done["inputs"][docs]["sha256"]) == 64 and str(model_dir) in done["inputs"]


def test_a_document_too_long_for_the_model_stops_the_run_before_any_stage(model_dir, data, capsys):
    long_doc = {"id": 7, "text": " ".join(["Ada lives in Oslo ."] * 60)}  # 300 words, the model has 256 positions
    write_jsonl(data / "docs.jsonl", [QA_DOCS[0], long_doc])
    cfg = _config(data, model_dir, stages="generate,answer", **FAST)
    assert cli.main(["run", "--config", str(cfg)]) == 2
    line = error_line(capsys)
    assert "document '7': its teacher prompt (system + document, before its question) is " in line
    assert "including 5 tokens to generate, over the model's context length of 256" in line
    assert not (data / "run").exists()


# ---------------------------------------------------------------- chunk and replay stages, model options

TRAIN = {"epochs": 1, "lora_r": 2, "batch_tokens": 64, "progress": False}


def test_a_chunk_section_splits_long_documents_before_any_stage(model_dir, data, capsys):
    long_doc = {"id": 7, "text": " ".join(["Ada lives in Oslo ."] * 60)}  # too long for the model, as above
    write_jsonl(data / "docs.jsonl", [QA_DOCS[0], long_doc])
    cfg = _config(data, model_dir, stages="chunk,generate", chunk={"chunk_tokens": 100, "overlap_tokens": 10},
                  **FAST)
    assert cli.main(["run", "--config", str(cfg)]) == 0
    out = data / "run"
    chunks = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert [c["id"] for c in chunks][:2] == ["d1", "7#0"] and all(c.get("source_id") == "7" for c in chunks[1:])
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    asked = {q["doc_id"] for q in questions}
    assert asked <= {c["id"] for c in chunks} and any(d.startswith("7#") for d in asked)  # generate read the chunks
    capsys.readouterr()
    assert cli.main(["run", "--config", str(cfg)]) == 0
    assert capsys.readouterr().err.count("done already, skipped") == 2


def test_a_chunk_size_too_large_for_the_model_is_named(model_dir, data, capsys):
    write_jsonl(data / "docs.jsonl", [{"id": 7, "text": " ".join(["Ada lives in Oslo ."] * 60)}])
    cfg = _config(data, model_dir, stages="chunk,generate", chunk={"chunk_tokens": 1000, "overlap_tokens": 0}, **FAST)
    assert cli.main(["run", "--config", str(cfg)]) == 2
    assert "document '7'" in (line := error_line(capsys)) and "chunk_tokens is too large" in line
    cfg = _config(data, model_dir, stages="generate", **FAST)
    assert cli.main(["run", "--config", str(cfg)]) == 2
    assert "or add `chunk: {chunk_tokens: N}` to the config" in error_line(capsys)


def test_the_replay_stage_prefills_with_the_document_in_the_student_prompt(model_dir, data, capsys):
    cfg = _config(data, model_dir, **FAST,  # no stages list: replay joins the default ones
                  prefill={"k": 4, "progress": False}, train={**TRAIN, "replay_fraction": 0.5})
    assert cli.main(["run", "--config", str(cfg)]) == 0
    out = data / "run"
    main = json.loads((out / "cache" / "manifest.json").read_text())
    replay = json.loads((out / "replay_cache" / "manifest.json").read_text())
    assert replay["student_sees_document"] is True and main["student_sees_document"] is False
    assert replay["k"] == main["k"] == 4 and replay["total_items"] == main["total_items"]  # prefill's settings
    run = json.loads((out / "train" / "run.json").read_text())
    assert run["replay_cache"]["path"].endswith("replay_cache")
    capsys.readouterr()
    assert cli.main(["run", "--config", str(cfg)]) == 0
    assert capsys.readouterr().err.count("done already, skipped") == 5
    raw = pipeline.load_config(cfg)  # a later run of train alone still mixes in the replay cache
    assert pipeline.wiring(raw, ["train"])["train"]["replay_cache"] == out / "replay_cache"
    assert pipeline.replay_wanted({"train": {"replay_fraction": "0.5"}})
    assert not pipeline.replay_wanted({"train": {"replay_fraction": 0.5, "replay_cache": "mine"}})
    assert not pipeline.replay_wanted({"train": {"replay_fraction": True}})


def test_without_replay_fraction_the_replay_stage_is_skipped(model_dir, data, capsys):
    write_jsonl(data / "run" / "qa.jsonl", [{"doc_id": "d1", "question": "who ?", "answer": "Ada"}])
    cfg = _config(data, model_dir, stages="prefill,replay", prefill={"k": 4, "progress": False})
    assert cli.main(["run", "--config", str(cfg)]) == 0
    assert "replay: skipped" in capsys.readouterr().err
    assert (data / "run" / "cache").is_dir() and not (data / "run" / "replay_cache").exists()
    bad = _config(data, model_dir, replay={"student_sees_document": False}, train={"replay_fraction": 0.5})
    assert cli.main(["run", "--config", str(bad)]) == 2
    assert "[replay] cannot set 'student_sees_document': the pipeline sets it" in error_line(capsys)


def test_attn_implementation_reaches_the_stages_and_the_cache_manifest(model_dir, data, capsys):
    write_jsonl(data / "run" / "qa.jsonl", [{"doc_id": "d1", "question": "who ?", "answer": "Ada"}])
    cfg = _config(data, model_dir, stages="prefill", attn_implementation="eager", quantize="none",
                  prefill={"k": 4, "progress": False})
    assert cli.main(["run", "--config", str(cfg)]) == 0
    manifest = json.loads((data / "run" / "cache" / "manifest.json").read_text())
    assert manifest["attn_implementation"] == "eager"
    bad = _config(data, model_dir, stages="prefill", attn_implementation="fast")
    assert cli.main(["run", "--config", str(bad)]) == 2
    assert "attn_implementation must be one of auto, sdpa, eager" in error_line(capsys)


def test_model_options_reach_every_model_stage_and_only_those():
    wired = {"model": "m", "device": "cpu", "attn_implementation": "eager", "quantize": "nf4"}
    for stage in pipeline.MODEL_STAGES:
        assert pipeline._model_options_for(stage, wired) == wired
    assert pipeline._model_options_for("chunk", wired) == {"model": "m"}  # chunk reads only the tokenizer

