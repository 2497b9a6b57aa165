"""Evaluation: answering methods, pd_rag, training seeds, judge parsing, input checks, the eval CLI."""
import argparse
import json

import pytest
from helpers import QA_DOCS as DOCS
from helpers import qa_model as tiny_model
from helpers import qa_tokenizer as tiny_tokenizer
from helpers import save_tiny

from pdengine import cli, generation, prompts
from pdengine import config as C
from pdengine import evaluate as ev
from pdengine.errors import InputError

QUESTIONS = [
    {"doc_id": "d1", "question": "where does Ada live ?", "answer": "Oslo"},
    {"doc_id": "d2", "question": "where does Bo live ?", "answer": "Rome"},
    {"doc_id": "d1", "question": "what is Ada ?", "answer": "a baker"},
]


# ---------------------------------------------------------------- answering


def test_methods_build_the_right_prompts(monkeypatch):
    seen = []

    def fake_generate(model, tokenizer, prompt_ids, **kwargs):
        assert kwargs["temperature"] == 0.0  # greedy
        seen.append(prompt_ids)
        return [[] for _ in prompt_ids]

    monkeypatch.setattr(generation, "generate_ids", fake_generate)
    tok = tiny_tokenizer()
    q = QUESTIONS[1:2]
    ev.answer_closed_book(None, tok, q, progress=False)
    ev.answer_open_book(None, tok, DOCS, q, progress=False)
    ev.answer_rag(None, tok, DOCS, q, top_n=1, progress=False)
    assert seen[0] == [prompts.student_prompt_ids(tok, q[0]["question"])]
    assert seen[1] == [prompts.teacher_prompt_ids(tok, DOCS[1]["text"], q[0]["question"])]
    assert seen[2] == seen[1]  # BM25 finds Bo's document


def test_parse_verdict():
    assert ev.parse_verdict(" Yes, it is.") is True
    assert ev.parse_verdict("no") is False and ev.parse_verdict("Incorrect.") is False
    assert ev.parse_verdict("maybe") is None and ev.parse_verdict("") is None


def test_evaluate_and_write_report_on_tiny_model(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    student = tiny_model(seed=1)
    metrics, per_q = ev.evaluate(
        model, tok, DOCS, QUESTIONS, students={"prompt_distillation": lambda: student}, judge_model=model,
        judge_tokenizer=tok, max_new_tokens=4, batch_size=2, rag_top_n=1, progress=False,
    )
    assert list(metrics) == ["base_closed_book", "teacher_open_book", "rag_bm25", "prompt_distillation", "pd_rag"]
    for m in metrics.values():
        assert m["n"] == 3 and all(0.0 <= m[k] <= 1.0 for k in ("exact_match", "f1", "contains", "judge"))
    assert len(per_q) == 3 and per_q[0]["retrieved"] == ["d1"] and per_q[1]["retrieved"] == ["d2"]
    direct = ev.answer_closed_book(model, tok, QUESTIONS, max_new_tokens=4, progress=False)
    assert [r["answers"]["base_closed_book"] for r in per_q] == direct
    again, _ = ev.evaluate(model, tok, DOCS, QUESTIONS, methods=("closed_book",), max_new_tokens=4, progress=False)
    assert again["base_closed_book"] == {k: v for k, v in metrics["base_closed_book"].items() if k != "judge"}

    paths = ev.write_report(tmp_path / "r", metrics, per_q, extra={"timings": {"eval_s": 1.0}})
    report = json.loads(paths["json"].read_text())
    pd = report["methods"]["prompt_distillation"]
    assert pd["f1"] == metrics["prompt_distillation"]["f1"]
    assert pd["f1_ci"][0] <= pd["f1"] <= pd["f1_ci"][1] and len(pd["judge_ci"]) == 2
    assert {"prompt_distillation-rag_bm25", "pd_rag-rag_bm25"} <= set(report["comparisons"])
    assert report["n_eval_questions"] == 3 and report["timings"] == {"eval_s": 1.0}
    md = paths["md"].read_text()
    assert "| method | exact_match | f1 | contains | judge |" in md and "| rag_bm25 |" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    lines = paths["answers"].read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["question"] == "what is Ada ?"


def test_evaluate_errors():
    tok = tiny_tokenizer()
    with pytest.raises(InputError, match="methods must be a subset of closed_book, open_book, rag, pd_rag"):
        ev.evaluate(None, tok, DOCS, QUESTIONS, methods=("oracle",))
    with pytest.raises(InputError, match=r"questions\[0\] has no 'answer'"):
        ev.evaluate(None, tok, DOCS, [{"question": "x"}])
    with pytest.raises(InputError, match="doc_id 'zz' is not among the documents"):
        ev.answer_open_book(None, tok, DOCS, [{"doc_id": "zz", "question": "x"}])
    with pytest.raises(InputError, match="extra must not override"):
        ev.write_report("/tmp/unused", {"a": {"f1": 1.0}}, [], extra={"methods": {}})


def test_markdown_table_percentages():
    table = ev.markdown_table({"base": {"exact_match": 0.5, "f1": 0.25, "contains": 1.0}})
    assert "| base | 50.0 | 25.0 | 100.0 |" in table


# ---------------------------------------------------------------- pd_rag


def test_pd_rag_is_the_pd_student_with_the_retrieved_passages(monkeypatch, capsys):
    calls = []

    def fake_generate(model, tokenizer, prompt_ids, **kwargs):
        calls.append((model, kwargs["desc"], prompt_ids))
        return [[] for _ in prompt_ids]

    monkeypatch.setattr(generation, "generate_ids", fake_generate)
    tok = tiny_tokenizer()
    metrics, per_q = ev.evaluate("base", tok, DOCS, QUESTIONS, students={"prompt_distillation": "pd"},
                                 rag_top_n=1, progress=False)
    assert list(metrics) == ["base_closed_book", "teacher_open_book", "rag_bm25", "prompt_distillation", "pd_rag"]
    by_desc = {desc: (model, ids) for model, desc, ids in calls}
    assert by_desc["pd + rag"][0] == "pd" and by_desc["rag"][0] == "base"
    assert by_desc["pd + rag"][1] == by_desc["rag"][1]  # the same retrieved passages, the same prompts
    assert per_q[1]["retrieved"] == ["d2"]
    ev.evaluate("base", tok, DOCS, QUESTIONS, students={"sft": "s"}, progress=False)
    assert "pd_rag skipped: no student named prompt_distillation" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("documents, questions, needle", [
    (DOCS + [{"id": "d1", "text": "Bo lives in Oslo ."}], QUESTIONS, "duplicate document id 'd1'"),
    ([{"id": "d1", "text": " "}, DOCS[1]], QUESTIONS, r"documents\[0\] \(id 'd1'\): the text is empty"),
    (DOCS, [{**QUESTIONS[0], "answer": 3}], r"questions\[0\]: a reference answer must be a string"),
    (DOCS, [{**QUESTIONS[0], "answer": [True]}], r"questions\[0\]: a reference answer must be a string"),
    (DOCS, [{**QUESTIONS[0], "question": ["x"]}], r"questions\[0\] must be an object with a non-empty string"),
    (DOCS, [{**QUESTIONS[0], "doc_id": "d9"}], "doc_id 'd9' is not among the documents"),
])
def test_bad_documents_and_questions_are_refused_before_answering(documents, questions, needle):
    with pytest.raises(InputError, match=needle):
        ev.evaluate(None, tiny_tokenizer(), documents, questions)


def test_eval_settings_define_the_flags():
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    wiring = ["--model", "m", "--documents", "d", "--questions", "q", "--out", "o"]
    assert C.from_args(ev.EvalConfig, parser.parse_args(wiring)) == ev.EvalConfig()
    got = C.from_args(ev.EvalConfig, parser.parse_args([*wiring, "--methods", "rag,pd_rag", "--no-progress"]))
    assert got == ev.EvalConfig(methods=("rag", "pd_rag"), progress=False)
    assert C.from_mapping(ev.EvalConfig, {"methods": []}, "eval").methods == ()
    with pytest.raises(InputError, match="eval: methods must be a subset"):
        C.from_mapping(ev.EvalConfig, {"methods": ["oracle"]}, "eval")


@pytest.fixture
def eval_files(tmp_path):
    model = save_tiny(tmp_path / "model")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    argv = ["eval", "--model", str(model), "--documents", str(tmp_path / "docs.jsonl"),
            "--questions", str(tmp_path / "eval.jsonl"), "--max-new-tokens", "2", "--no-progress"]
    return tmp_path, argv


def _one_error_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err
    return err[0]


def test_eval_cli_one_line_errors(eval_files, capsys):
    tmp, argv = eval_files
    (tmp / "file").write_text("x")
    assert cli.main([*argv, "--out", str(tmp / "file")]) == 2
    assert "--out" in _one_error_line(capsys) and (tmp / "file").read_text() == "x"
    (tmp / "ad").mkdir()
    twice = ["--adapter", f"pd={tmp / 'ad'}"] * 2
    assert cli.main([*argv, "--out", str(tmp / "r"), *twice]) == 2
    assert "is given twice" in _one_error_line(capsys)
    assert cli.main([*argv, "--out", str(tmp / "r"), "--adapter", "pd"]) == 2
    assert "--adapter expects NAME=DIR" in _one_error_line(capsys)
    (tmp / "eval.jsonl").write_text(json.dumps({**QUESTIONS[0], "answer": {"a": 1}}) + "\n")
    assert cli.main([*argv, "--out", str(tmp / "r")]) == 2
    assert "a reference answer must be a string" in _one_error_line(capsys)
    (tmp / "docs.jsonl").write_text(json.dumps(DOCS[0]) + "\n" + json.dumps(DOCS[0]) + "\n")
    assert cli.main([*argv, "--out", str(tmp / "r")]) == 2
    assert "duplicate document id 'd1'" in _one_error_line(capsys)


def test_eval_holds_a_lock_on_its_output_directory(eval_files, capsys):
    from pdengine.locking import DirectoryLock

    tmp, argv = eval_files
    with DirectoryLock(tmp / "r", purpose="another eval"):
        assert cli.main([*argv, "--out", str(tmp / "r")]) == 2
        assert "in use by another pdengine process" in _one_error_line(capsys)
    assert not (tmp / "r" / "report.json").exists()
    assert cli.main([*argv, "--out", str(tmp / "r"), "--methods", "closed_book"]) == 0
    report = json.loads((tmp / "r" / "report.json").read_text())
    assert list(report["methods"]) == ["base_closed_book"] and report["settings"]["max_new_tokens"] == 2


def test_several_training_seeds_of_one_student(monkeypatch):
    answers = {"s0": "Oslo", "s1": "Rome"}
    monkeypatch.setattr(generation, "greedy_texts",
                        lambda model, tok, p, **k: [answers.get(model, "x")] * len(p))
    metrics, per_q = ev.evaluate("base", tiny_tokenizer(), DOCS, QUESTIONS[:2], methods=("closed_book",),
                                 students={"sft": ["s0", lambda: "s1"]}, progress=False)
    # s0 right on question 0, s1 on question 1: each seed 50 %, and so is their mean
    assert metrics["sft"]["contains"] == 0.5 and metrics["sft"]["seeds"] == 2
    assert metrics["sft"]["per_seed"]["contains"] == [0.5, 0.5]
    assert per_q[0]["answers"]["sft"] == ["Oslo", "Rome"] and per_q[0]["scores"]["sft"]["contains"] == 0.5
    assert [s["contains"] for s in per_q[1]["seed_scores"]["sft"]] == [0.0, 1.0]
    assert "seed_scores" not in per_q[0] or "base_closed_book" not in per_q[0]["seed_scores"]


def test_unknown_tokens_are_counted_before_answering(monkeypatch, capsys):
    monkeypatch.setattr(generation, "greedy_texts", lambda model, tok, p, **k: ["Oslo"] * len(p))
    docs = [{"id": "d1", "text": "Ada lives in Oslo . Ada works as zookeeper ."}, DOCS[1]]
    ev.evaluate("base", tiny_tokenizer(), docs, QUESTIONS, methods=("closed_book",), progress=False)
    assert "eval: warning: 1 of 15 tokens (6.7 %) of the documents are '<unk>'" in capsys.readouterr().err
    with pytest.raises(InputError, match="the model cannot read this text"):
        ev.evaluate("base", tiny_tokenizer(), [{"id": "d1", "text": "zebra " * 7 + "Ada"}, DOCS[1]], QUESTIONS,
                    methods=("closed_book",), progress=False)


def test_eval_cli_reports_several_seeds_of_one_adapter(eval_files):
    import torch

    import pdengine

    tmp, argv = eval_files
    adapters = []
    for seed in (0, 1):
        model = tiny_model()
        pdengine.add_lora(model, r=2, alpha=4)
        torch.manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.5)  # each "seed" answers differently
        adapters += ["--adapter", f"prompt_distillation={pdengine.save_adapter(model, tmp / f'pd{seed}')}"]
    assert cli.main([*argv, "--out", str(tmp / "r"), "--methods", "rag,pd_rag", *adapters]) == 0
    report = json.loads((tmp / "r" / "report.json").read_text())
    assert set(report["methods"]) == {"rag_bm25", "prompt_distillation", "pd_rag"}
    pd = report["methods"]["prompt_distillation"]
    assert pd["seeds"] == 2 and pd["f1"] == pytest.approx(sum(pd["per_seed"]["f1"]) / 2)
    assert report["methods"]["pd_rag"]["seeds"] == 2 and "pd_rag-rag_bm25" in report["comparisons"]
    assert report["adapters"]["prompt_distillation"] == [str(tmp / "pd0"), str(tmp / "pd1")]
    row = json.loads((tmp / "r" / "answers.jsonl").read_text().splitlines()[0])
    assert len(row["answers"]["prompt_distillation"]) == 2 and len(row["seed_scores"]["pd_rag"]) == 2


def test_questions_without_their_document_are_counted_in_one_error():
    from pdengine.evaluate import check_eval_inputs

    questions = [{**QUESTIONS[0], "doc_id": "gone"}, QUESTIONS[0], {**QUESTIONS[0], "doc_id": "gone2"}]
    with pytest.raises(InputError, match=r"^2 of 3 eval questions have no document among the documents "
                                         r"\(first: questions\[0\]: doc_id 'gone' is not among"):
        check_eval_inputs(DOCS, questions)
