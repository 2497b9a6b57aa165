"""Question generation and teacher answers: parsing, filtering, dedupe, settings, CLI checks."""
import argparse
import json

import pytest
from helpers import QA_DOCS as DOCS
from helpers import qa_model as tiny_model
from helpers import qa_tokenizer as tiny_tokenizer
from helpers import save_tiny

from pdengine import cli, generation, prompts, qa
from pdengine import config as C
from pdengine.errors import InputError


# ---------------------------------------------------------------- parsing


def test_parse_numbered_bulleted_and_plain_lines():
    text = (
        "Here are 3 questions:\n"
        "1. Where does Ada live?\n"
        "2) What does Ada do?\n"
        "- Who lives in Rome?\n"
        "* \"Is Bo a baker?\"\n"
        "Question 5: Where is Oslo? It is in Norway.\n"
        "Where is Rome?\n"
        "Q7: no question mark here\n"
    )
    assert qa.parse_questions(text) == [
        "Where does Ada live?", "What does Ada do?", "Who lives in Rome?",
        "Is Bo a baker?", "Where is Oslo?", "Where is Rome?",
    ]


def test_parse_splits_several_numbered_questions_on_one_line():
    assert qa.parse_questions("1. Who is Ada? 2. Where is Bo?") == ["Who is Ada?", "Where is Bo?"]


def test_parse_without_question_mark_requirement_keeps_plain_lines():
    assert qa.parse_questions("1. name the baker\n\n2. x", require_question_mark=False) == ["name the baker"]


@pytest.mark.parametrize("question", [
    "What does the text say about Ada?",
    "According to the passage, where is Oslo?",
    "Who is mentioned in this article?",
    "What is the main idea of the document?",
    "What happens in the story?",
])
def test_questions_that_need_the_document_are_dropped(question):
    assert qa.mentions_document(question)
    assert qa.parse_questions(question) == []


def test_normal_questions_are_not_flagged():
    for q in ["Where does Ada live?", "What text did Ada write in 1990?", "Who wrote Textbook X?"]:
        assert not qa.mentions_document(q)


def test_normalize_question_for_dedupe():
    assert qa.normalize_question("  Where does ADA live?? ") == qa.normalize_question("where does Ada live")
    assert qa.normalize_question("Who is Ada?") != qa.normalize_question("Who is Bo?")


def test_question_set_dedupes_and_caps():
    qs = qa._QuestionSet(limit=2)
    for q in ["Who is Ada?", "who is ada", "Where is Bo?", "What is Oslo?"]:
        qs.add(q)
    assert qs.questions == ["Who is Ada?", "Where is Bo?"] and qs.full


# ---------------------------------------------------------------- questions and answers


def test_generate_questions_structure_and_determinism():
    model, tok = tiny_model(), tiny_tokenizer()
    kwargs = dict(n_questions=3, per_call=2, max_new_tokens=12, batch_size=4, seed=7, progress=False)
    rows = qa.generate_questions(model, tok, DOCS, **kwargs)
    assert rows == qa.generate_questions(model, tok, DOCS, **kwargs)
    assert rows, "a random model over a tiny vocabulary still writes some '?' lines"
    for doc in DOCS:
        mine = [r["question"] for r in rows if r["doc_id"] == doc["id"]]
        assert len(mine) <= 3
        assert len({qa.normalize_question(q) for q in mine}) == len(mine)
    assert all(r["question"].endswith("?") and set(r) == {"doc_id", "question"} for r in rows)
    assert qa.generate_questions(model, tok, DOCS, **{**kwargs, "seed": 8}) != rows


def test_generate_questions_respects_max_calls(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompt_ids, **kwargs):
        calls.append(len(prompt_ids))
        return [tokenizer("who is Ada ? \n who is Ada ?").input_ids for _ in prompt_ids]

    monkeypatch.setattr(generation, "generate_ids", fake_generate)
    tok = tiny_tokenizer()
    rows = qa.generate_questions(None, tok, DOCS, n_questions=4, per_call=2, max_calls=3, progress=False)
    # every call repeats one question: each document keeps 1 and stops after 3 calls
    assert [r["doc_id"] for r in rows] == ["d1", "d2"]
    assert sum(calls) == 2 * 3


def test_generate_questions_custom_prompt_and_errors():
    model, tok = tiny_model(), tiny_tokenizer()
    with pytest.raises(InputError, match="placeholder"):
        qa.generate_questions(model, tok, DOCS, prompt="{nope}", progress=False)
    with pytest.raises(InputError, match="n_questions"):
        qa.generate_questions(model, tok, DOCS, n_questions=0)
    with pytest.raises(InputError, match="documents is empty"):
        qa.generate_questions(model, tok, [])
    with pytest.raises(InputError, match="temperature"):
        qa.generate_questions(model, tok, DOCS, temperature=-1.0, progress=False)


def test_answer_questions_structure_ids_and_determinism():
    model, tok = tiny_model(), tiny_tokenizer()
    questions = [{"doc_id": "d1", "question": "where is Ada ?"}, {"doc_id": "d2", "question": "who is Bo ?"}]
    kwargs = dict(n_answers=2, max_new_tokens=6, batch_size=3, seed=3, progress=False)
    rows = qa.answer_questions(model, tok, DOCS, questions, **kwargs)
    assert rows == qa.answer_questions(model, tok, DOCS, questions, **kwargs)
    assert [(r["doc_id"], r["question"]) for r in rows] == [
        ("d1", "where is Ada ?"), ("d1", "where is Ada ?"), ("d2", "who is Bo ?"), ("d2", "who is Bo ?")]
    for r in rows:
        assert r["answer_ids"] == prompts.strip_end_of_turn(r["answer_ids"], tok)
        assert tok.eos_token_id not in r["answer_ids"] and len(r["answer_ids"]) <= 6
        assert r["answer"] == tok.decode(r["answer_ids"], skip_special_tokens=True).strip()
    with pytest.raises(InputError, match="doc_id 'zz'"):
        qa.answer_questions(model, tok, DOCS, [{"doc_id": "zz", "question": "x"}], progress=False)


def test_answers_follow_the_teacher_prompt(monkeypatch):
    seen = []

    def fake_generate(model, tokenizer, prompt_ids, **kwargs):
        seen.extend(prompt_ids)
        return [generation.Generated([9, 10], True) for _ in prompt_ids]

    monkeypatch.setattr(generation, "generate_sequences", fake_generate)
    tok = tiny_tokenizer()
    rows = qa.answer_questions(None, tok, DOCS, [{"doc_id": "d2", "question": "who is Bo ?"}], progress=False)
    assert seen == [prompts.teacher_prompt_ids(tok, DOCS[1]["text"], "who is Bo ?")]
    assert rows[0]["answer_ids"] == [9, 10]


def test_integer_document_ids_are_strings_everywhere(monkeypatch):
    docs = [{"id": 1, "text": "Ada lives in Oslo ."}]
    monkeypatch.setattr(generation, "generate_sequences",
                        lambda m, tok, p, **k: [generation.Generated([9, 10], True) for _ in p])
    rows = qa.answer_questions(None, tiny_tokenizer(), docs, [{"doc_id": "1", "question": "who ?"}], progress=False)
    assert rows[0]["doc_id"] == "1"
    with pytest.raises(InputError, match="duplicate document id '1'"):
        qa.answer_questions(None, tiny_tokenizer(), docs + [{"id": "1", "text": "x"}], [], progress=False)


# ---------------------------------------------------------------- reported drops


def test_fewer_questions_than_asked_is_one_warning_with_counts(monkeypatch, capsys):
    monkeypatch.setattr(generation, "generate_ids",
                        lambda m, tok, p, **k: [tok("who is Ada ?").input_ids for _ in p])
    rows = qa.generate_questions(None, tiny_tokenizer(), DOCS, n_questions=4, per_call=2, max_calls=2,
                                 progress=False)
    assert len(rows) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert lines == ["generate: warning: 2 of 2 documents have fewer than 4 questions (2 of 8; fewest 1)"]


def test_near_duplicate_questions_are_counted(monkeypatch, capsys):
    monkeypatch.setattr(generation, "generate_ids", lambda m, tok, p, **k: [
        tok("1. who is Ada in Oslo ? 2. who is Ada in the Oslo ?").input_ids for _ in p])
    rows = qa.generate_questions(None, tiny_tokenizer(), DOCS[:1], n_questions=2, per_call=2, progress=False)
    assert len(rows) == 2  # both kept: a warning, not a drop
    assert "generate: warning: 1 of 2 questions repeat another of their document" in capsys.readouterr().err


def test_empty_and_truncated_answers_are_dropped_and_counted(monkeypatch, capsys):
    outputs = [generation.Generated([], True), generation.Generated([9, 10], True), generation.Generated([6], True),
               generation.Generated([23, 24], False)]
    monkeypatch.setattr(generation, "generate_sequences", lambda m, tok, p, **k: outputs[:len(p)])
    questions = [{"doc_id": "d1", "question": f"who is {w} ?"} for w in ("Ada", "Bo", "a", "the")]
    rows = qa.answer_questions(None, tiny_tokenizer(), DOCS, questions, max_new_tokens=5, keep_truncated=False,
                               progress=False)
    # [] has no token, [6] decodes to the blank "\n", [23, 24] never reached end of turn: never trained on
    assert [r["question"] for r in rows] == ["who is Bo ?"] and "truncated" not in rows[0]
    assert "answer: warning: 2 of 4 answers empty, 1 cut off at max_new_tokens=5; dropped 3" in capsys.readouterr().err
    rows = qa.answer_questions(None, tiny_tokenizer(), DOCS, questions, max_new_tokens=5, progress=False)
    assert [r["question"] for r in rows] == ["who is Bo ?", "who is the ?"]  # empty ones always dropped
    assert "1 cut off at max_new_tokens=5 (kept: keep_truncated); dropped 2" in capsys.readouterr().err
    monkeypatch.setattr(generation, "generate_sequences", lambda m, tok, p, **k: [outputs[0]] * len(p))
    with pytest.raises(InputError, match="all 4 answers are empty or cut off"):
        qa.answer_questions(None, tiny_tokenizer(), DOCS, questions, progress=False)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("add, cls, wiring", [
    (qa.add_generate_arguments, qa.GenerateConfig, []),
    (qa.add_answer_arguments, qa.AnswerConfig, ["--questions", "q"]),
])
def test_stage_settings_define_the_flags_and_their_defaults(add, cls, wiring):
    parser = argparse.ArgumentParser()
    add(parser)
    wiring = ["--model", "m", "--documents", "d", "--out", "o", *wiring]
    assert C.from_args(cls, parser.parse_args(wiring)) == cls()
    assert C.from_args(cls, parser.parse_args([*wiring, "--no-progress", "--seed", "4"])) == cls(progress=False, seed=4)


def test_config_sections_are_checked():
    assert C.from_mapping(qa.GenerateConfig, {"n-questions": 3, "top_k": 0}, "generate").n_questions == 3
    with pytest.raises(InputError, match="generate.per_call: expected an integer"):
        C.from_mapping(qa.GenerateConfig, {"per_call": "many"}, "generate")
    with pytest.raises(InputError, match="answer: temperature must be a finite number"):
        C.from_mapping(qa.AnswerConfig, {"temperature": float("inf")}, "answer")
    with pytest.raises(InputError, match="n_answers must be > 0"):
        qa.answer_questions(None, tiny_tokenizer(), DOCS, [], n_answers=0)


def test_question_prompt_from_a_file(tmp_path):
    (tmp_path / "p.txt").write_text("Ask {n} about {document}")
    assert qa.question_prompt_text("@" + str(tmp_path / "p.txt")) == "Ask {n} about {document}"
    assert qa.question_prompt_text(None) == qa.DEFAULT_QUESTION_PROMPT
    with pytest.raises(InputError, match="not found"):
        qa.question_prompt_text("@" + str(tmp_path / "none.txt"))


# ---------------------------------------------------------------- CLI


@pytest.fixture
def files(tmp_path):
    model = save_tiny(tmp_path / "model")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "q.jsonl").write_text(json.dumps({"doc_id": "d1", "question": "where is Ada ?"}) + "\n")
    return tmp_path, ["--model", str(model), "--documents", str(tmp_path / "docs.jsonl"), "--no-progress"]


def test_answer_refuses_to_overwrite_without_force(files, capsys):
    tmp, common = files
    out = tmp / "qa.jsonl"
    out.write_text("precious\n")
    argv = ["answer", *common, "--questions", str(tmp / "q.jsonl"), "--out", str(out), "--max-new-tokens", "3",
            "--temperature", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists already; pass --force" in err[0]
    assert out.read_text() == "precious\n"
    assert cli.main([*argv, "--force"]) == 0
    assert json.loads(out.read_text())["answer_ids"] == [9, 22, 9]  # the tiny model's greedy answer


def test_generate_refuses_to_overwrite_without_force(files, capsys):
    tmp, common = files
    (tmp / "o.jsonl").write_text("precious\n")
    argv = ["generate", *common, "--out", str(tmp / "o.jsonl"), "--n-questions", "1", "--max-new-tokens", "4"]
    assert cli.main(argv) == 2
    assert "exists already; pass --force" in capsys.readouterr().err
    assert (tmp / "o.jsonl").read_text() == "precious\n"


def test_generate_refuses_bad_documents_before_loading(files, capsys):
    tmp, common = files
    (tmp / "docs.jsonl").write_text(json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": "a", "text": "y"}))
    assert cli.main(["generate", *common, "--out", str(tmp / "o.jsonl")]) == 2
    assert "duplicate document id 'a'" in capsys.readouterr().err
    (tmp / "docs.jsonl").write_text(json.dumps({"id": "a", "text": "  "}) + "\n")
    assert cli.main(["generate", *common, "--out", str(tmp / "o.jsonl")]) == 2
    assert "text is empty" in capsys.readouterr().err
