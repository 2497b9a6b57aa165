"""CLI smoke tests: --help of every command, clear one-line errors, stages on a tiny model,
and `pdengine run` with resumable stages."""
import json

import pytest

from helpers import QA_DOCS as DOCS
from helpers import error_line

from pdengine import cli
from pdengine.io import write_jsonl

EVAL = [
    {"doc_id": "d1", "question": "where does Ada live ?", "answer": "Oslo"},
    {"doc_id": "d2", "question": "where does Bo live ?", "answer": "Rome"},
]


@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    write_jsonl(tmp_path / "eval.jsonl", EVAL)
    return tmp_path


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", [*cli.STAGE_COMMANDS, "run", "bench"])
def test_every_command_has_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert f"usage: pdengine {command}" in capsys.readouterr().out


def test_top_level_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in [*cli.STAGE_COMMANDS, "run", "bench"])
    assert cli.main([]) == 2


def test_bench_lists_and_rejects_unknown(capsys):
    assert cli.main(["bench"]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("available benchmarks:")
    assert cli.main(["bench", "no_such_bench"]) == 2
    assert "unknown benchmark 'no_such_bench'" in error_line(capsys)


# ---------------------------------------------------------------- errors


def test_missing_and_empty_documents(model_dir, tmp_path, capsys):
    base = ["generate", "--model", str(model_dir), "--out", str(tmp_path / "q.jsonl")]
    assert cli.main([*base, "--documents", str(tmp_path / "nope.jsonl")]) == 2
    assert error_line(capsys) == f"pdengine generate: error: {tmp_path / 'nope.jsonl'}: file not found"
    (tmp_path / "empty.jsonl").write_text("")
    assert cli.main([*base, "--documents", str(tmp_path / "empty.jsonl")]) == 2
    assert "empty.jsonl: file is empty" in error_line(capsys)


def test_malformed_jsonl_names_file_and_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    assert cli.main(["generate", "--model", str(model_dir), "--documents", str(bad), "--out", "x"]) == 2
    assert "docs.jsonl:2: malformed JSON" in error_line(capsys)


def test_bad_model_directories(data, capsys):
    args = ["--documents", str(data / "docs.jsonl"), "--out", str(data / "q.jsonl")]
    assert cli.main(["generate", "--model", str(data / "missing"), *args]) == 2
    assert "does not exist" in error_line(capsys)
    not_lm = data / "bert"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert cli.main(["generate", "--model", str(not_lm), *args]) == 2
    assert "not a causal LM" in error_line(capsys)


def _write_config(path, **config):
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def test_unknown_config_keys_list_valid_keys(model_dir, data, capsys):
    base = dict(model=str(model_dir), documents=str(data / "docs.jsonl"), out=str(data / "run"))
    cfg = _write_config(data / "a.yaml", **base, epochz=3)
    assert cli.main(["run", "--config", str(cfg)]) == 2
    line = error_line(capsys)
    assert "unknown key(s) ['epochz']" in line and "valid keys: model, documents, out" in line
    cfg = _write_config(data / "b.yaml", **base, generate={"n_question": 3})
    assert cli.main(["run", "--config", str(cfg)]) == 2
    line = error_line(capsys)
    assert "generate: unknown key 'n_question'" in line and "n_questions" in line
    cfg = _write_config(data / "c.yaml", **base, generate={"out": "elsewhere.jsonl"})
    assert cli.main(["run", "--config", str(cfg)]) == 2
    assert "[generate] cannot set 'out': the pipeline sets it" in error_line(capsys)
    cfg = _write_config(data / "d.yaml", **base, answer={"temperature": "hot"})
    assert cli.main(["run", "--config", str(cfg)]) == 2
    assert "answer.temperature: expected a number, got 'hot'" in error_line(capsys)
    cfg = _write_config(data / "e.yaml", **base, prefill={"force": True})
    assert cli.main(["run", "--config", str(cfg)]) == 2
    assert "[prefill] cannot set 'force'" in error_line(capsys)
    assert not (data / "run").exists(), "nothing runs before the whole config is valid"


def test_config_file_errors(data, capsys):
    assert cli.main(["run", "--config", str(data / "none.yaml")]) == 2
    assert "not found" in error_line(capsys)
    (data / "x.json").write_text("{}")
    assert cli.main(["run", "--config", str(data / "x.json")]) == 2
    assert ".yaml, .yml or .toml" in error_line(capsys)
    (data / "m.toml").write_text('model = "m"\n')
    assert cli.main(["run", "--config", str(data / "m.toml")]) == 2
    assert "missing required key(s) ['documents', 'out']" in error_line(capsys)


# ---------------------------------------------------------------- stages and the pipeline


def test_generate_answer_eval_commands(model_dir, data):
    common = ["--model", str(model_dir), "--documents", str(data / "docs.jsonl"), "--batch-size", "4"]
    assert cli.main(["generate", *common, "--out", str(data / "q.jsonl"), "--n-questions", "2",
                     "--per-call", "2", "--max-new-tokens", "12"]) == 0
    questions = [json.loads(x) for x in (data / "q.jsonl").read_text().splitlines()]
    assert questions and all(set(q) == {"doc_id", "question"} for q in questions)
    assert cli.main(["answer", *common, "--questions", str(data / "q.jsonl"), "--out", str(data / "qa.jsonl"),
                     "--max-new-tokens", "5"]) == 0
    qa_rows = [json.loads(x) for x in (data / "qa.jsonl").read_text().splitlines()]
    assert [r["question"] for r in qa_rows] == [q["question"] for q in questions]
    assert all(isinstance(r["answer_ids"], list) for r in qa_rows)
    assert cli.main(["eval", *common, "--questions", str(data / "eval.jsonl"), "--out", str(data / "ev"),
                     "--max-new-tokens", "4", "--rag-top-n", "1"]) == 0
    report = json.loads((data / "ev" / "report.json").read_text())
    assert set(report["methods"]) == {"base_closed_book", "teacher_open_book", "rag_bm25"}
    assert report["n_eval_questions"] == 2


def test_run_whole_pipeline_skips_finished_stages_and_force_redoes(model_dir, data, capsys):
    cfg = _write_config(
        data / "run.toml.yaml", model=str(model_dir), documents=str(data / "docs.jsonl"), out=str(data / "run"),
        eval_questions=str(data / "eval.jsonl"),
        generate={"n_questions": 2, "per_call": 2, "max_new_tokens": 12, "batch_size": 4},
        answer={"max_new_tokens": 5, "n-answers": 1},
        prefill={"k": 4, "no_progress": True},
        train={"epochs": 1, "lora_r": 2, "batch_tokens": 64, "no_progress": True},
        eval={"max_new_tokens": 4, "methods": ["closed_book", "rag"], "rag_top_n": 1},
    )
    assert cli.main(["run", "--config", str(cfg)]) == 0
    out = data / "run"
    for name in ("questions.jsonl", "qa.jsonl", "cache/manifest.json", "train/adapter/adapter_config.json",
                 "eval/report.json", "eval/report.md", "eval/answers.jsonl"):
        assert (out / name).exists(), name
    methods = json.loads((out / "eval/report.json").read_text())["methods"]
    assert set(methods) == {"base_closed_book", "rag_bm25", "prompt_distillation"}
    capsys.readouterr()
    stamp = (out / "qa.jsonl").stat().st_mtime_ns

    assert cli.main(["run", "--config", str(cfg)]) == 0
    assert capsys.readouterr().err.count("done already, skipped") == 5
    assert (out / "qa.jsonl").stat().st_mtime_ns == stamp

    assert cli.main(["run", "--config", str(cfg), "--force", "answer"]) == 0
    err = capsys.readouterr().err
    assert "generate: done already" in err
    assert all(f"{s}: running" in err for s in ("answer", "prefill", "train", "eval"))
    assert (out / "qa.jsonl").stat().st_mtime_ns != stamp


def test_run_pipeline_reruns_a_stage_whose_settings_changed(model_dir, data, capsys):
    base = dict(model=str(model_dir), documents=str(data / "docs.jsonl"), out=str(data / "run"),
                stages="generate,answer", generate={"n_questions": 2, "per_call": 2, "max_new_tokens": 12})
    cfg = _write_config(data / "c.yaml", **base, answer={"max_new_tokens": 3})
    assert cli.main(["run", "--config", str(cfg)]) == 0
    capsys.readouterr()
    cfg = _write_config(data / "c.yaml", **base, answer={"max_new_tokens": 4})
    assert cli.main(["run", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "generate: done already" in err and "answer: running" in err


def test_prefill_takes_the_model_loading_flags(model_dir, data, capsys):
    write_jsonl(data / "qa.jsonl", [{"doc_id": "d1", "question": "who ?", "answer": "Ada"}])
    base = ["prefill", "--model", str(model_dir), "--documents", str(data / "docs.jsonl"), "--qa",
            str(data / "qa.jsonl"), "--out", str(data / "cache"), "--k", "4", "--no-progress", "--device", "cpu"]
    assert cli.main([*base, "--attn-implementation", "eager", "--quantize", "none"]) == 0
    assert json.loads((data / "cache" / "manifest.json").read_text())["attn_implementation"] == "eager"
    assert cli.main([*base, "--force", "--attn-implementation", "flash_attention_2"]) == 2
    assert "'flash_attention_2' cannot be used" in error_line(capsys)
    assert cli.main([*base, "--force", "--quantize", "fp8"]) == 2  # argparse: not a choice
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_train_takes_the_loading_flags_for_training(model_dir, data, capsys):
    train = ["train", "--model", str(model_dir), "--cache", str(data / "cache"), "--out", str(data / "tr"),
             "--device", "cpu"]
    assert cli.main([*train, "--attn-implementation", "flex_attention"]) == 2  # no CPU backward: before any work
    assert "'flex_attention' cannot be used: it is not available on cpu" in error_line(capsys)
    assert cli.main([*train, "--quantize", "fp8"]) == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_generate_answer_eval_take_the_loading_flags(model_dir, data, capsys):
    common = ["--model", str(model_dir), "--documents", str(data / "docs.jsonl"), "--batch-size", "4",
              "--device", "cpu"]
    flags = ["--attn-implementation", "eager", "--quantize", "none"]
    assert cli.main(["generate", *common, *flags, "--out", str(data / "q.jsonl"), "--n-questions", "2",
                     "--per-call", "2", "--max-new-tokens", "12"]) == 0
    assert cli.main(["answer", *common, *flags, "--questions", str(data / "q.jsonl"), "--out",
                     str(data / "qa.jsonl"), "--max-new-tokens", "5"]) == 0
    assert cli.main(["eval", *common, *flags, "--questions", str(data / "eval.jsonl"), "--out", str(data / "ev"),
                     "--max-new-tokens", "4", "--methods", "closed_book"]) == 0
    capsys.readouterr()
    for command in (["generate", "--out", str(data / "q2.jsonl")],
                    ["eval", "--questions", str(data / "eval.jsonl"), "--out", str(data / "ev2")]):
        assert cli.main([command[0], *common, "--attn-implementation", "flash_attention_2", *command[1:]]) == 2
        assert "'flash_attention_2' cannot be used" in error_line(capsys)


@pytest.mark.parametrize("command", ["export", "curves"])
def test_export_and_curves_are_commands(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert f"usage: pdengine {command}" in capsys.readouterr().out
