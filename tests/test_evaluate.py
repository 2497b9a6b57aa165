"""Evaluation: SQuAD metrics, BM25, answering methods, judge parsing, reports."""
import json

import pytest

from pdengine import evaluate as ev
from pdengine import prompts, qa
from test_qa import DOCS, tiny_model, tiny_tokenizer

QUESTIONS = [
    {"doc_id": "d1", "question": "where does Ada live ?", "answer": "Oslo"},
    {"doc_id": "d2", "question": "where does Bo live ?", "answer": "Rome"},
    {"doc_id": "d1", "question": "what is Ada ?", "answer": "a baker"},
]


# ---------------------------------------------------------------- metrics (SQuAD cases)


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple, a pear! ", "apple pear"),
    ("Theater (1990).", "theater 1990"),
    ("U.S.A.", "usa"),
    ("A", ""),
])
def test_normalize_answer(text, normalized):
    assert ev.normalize_answer(text) == normalized


def test_exact_match_ignores_case_articles_punctuation_whitespace():
    assert ev.exact_match("the  Oslo.", "Oslo") == 1.0
    assert ev.exact_match("Oslo, Norway", "Oslo") == 0.0


def test_f1_partial_overlap():
    # pred tokens {in, oslo, norway}, ref {oslo}: precision 1/3, recall 1 -> F1 0.5
    assert ev.f1("in Oslo, Norway", "Oslo") == pytest.approx(0.5)
    # pred {paris, france}, ref {paris, texas}: 1 common -> P = R = 1/2 -> 0.5
    assert ev.f1("Paris France", "the Paris, Texas") == pytest.approx(0.5)
    assert ev.f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert ev.f1("", "") == 1.0 and ev.f1("x", "") == 0.0 and ev.f1("Rome", "Oslo") == 0.0


def test_contains_matches_whole_words_only():
    assert ev.contains("She lives in Oslo, Norway.", "oslo") == 1.0
    assert ev.contains("Osloville", "Oslo") == 0.0
    assert ev.contains("The baker", "a baker") == 1.0


def test_score_means_and_multiple_references():
    result = ev.score(["Oslo", "Paris", "in Rome"], ["Oslo", "Rome", ["Milan", "Rome"]])
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["contains"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert result["n"] == 3
    with pytest.raises(ValueError, match="differ in length"):
        ev.score(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        ev.score([], [])


# ---------------------------------------------------------------- BM25


def test_bm25_ranks_rare_matching_terms_first():
    texts = ["the cat sat on the mat", "Ada lives in Oslo", "the dog and the cat", "Oslo is cold"]
    index = ev.BM25(texts)
    assert index.top("where does Ada live in Oslo", 2) == [1, 3]
    assert index.top("cat", 2) == [2, 0]  # same tf: the shorter text (5 words vs 6) first
    scores = index.scores("zebra")
    assert scores == [0.0] * 4


def test_bm25_length_normalisation():
    index = ev.BM25(["oslo", "oslo " + "filler " * 30, "rome"])
    s = index.scores("oslo")
    assert s[0] > s[1] > s[2] == 0.0


def test_retrieve_splits_long_documents_into_passages():
    docs = [{"id": "long", "text": "alpha " * 10 + "Oslo " + "beta " * 10}, {"id": "short", "text": "Rome Rome"}]
    passages = ev.split_passages(docs, passage_words=8)
    assert [p["doc_id"] for p in passages] == ["long"] * 3 + ["short"]
    hits = ev.retrieve(docs, [{"question": "Oslo ?"}, {"question": "Rome ?"}], top_n=1, passage_words=8)
    assert hits[0]["doc_ids"] == ["long"] and "Oslo" in hits[0]["context"]
    assert hits[1] == {"context": "Rome Rome", "doc_ids": ["short"]}


# ---------------------------------------------------------------- answering


def test_methods_build_the_right_prompts(monkeypatch):
    seen = []

    def fake_generate(model, tokenizer, prompt_ids, **kwargs):
        assert kwargs["temperature"] == 0.0  # greedy
        seen.append(prompt_ids)
        return [[] for _ in prompt_ids]

    monkeypatch.setattr(qa, "generate_ids", fake_generate)
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
        model, tok, DOCS, QUESTIONS, students={"student": lambda: student}, judge_model=model,
        judge_tokenizer=tok, max_new_tokens=4, batch_size=2, rag_top_n=1, progress=False,
    )
    assert list(metrics) == ["base_closed_book", "teacher_open_book", "rag_bm25", "student"]
    for m in metrics.values():
        assert m["n"] == 3 and all(0.0 <= m[k] <= 1.0 for k in ("exact_match", "f1", "contains", "judge"))
    assert len(per_q) == 3 and per_q[0]["retrieved"] == ["d1"] and per_q[1]["retrieved"] == ["d2"]
    direct = ev.answer_closed_book(model, tok, QUESTIONS, max_new_tokens=4, progress=False)
    assert [r["answers"]["base_closed_book"] for r in per_q] == direct
    again, _ = ev.evaluate(model, tok, DOCS, QUESTIONS, methods=("closed_book",), max_new_tokens=4, progress=False)
    assert again["base_closed_book"] == {k: v for k, v in metrics["base_closed_book"].items() if k != "judge"}

    paths = ev.write_report(tmp_path / "r", metrics, per_q, extra={"timings": {"eval_s": 1.0}})
    report = json.loads(paths["json"].read_text())
    assert report["methods"]["student"]["f1"] == metrics["student"]["f1"]
    assert report["n_eval_questions"] == 3 and report["timings"] == {"eval_s": 1.0}
    md = paths["md"].read_text()
    assert "| method | exact_match | f1 | contains | judge |" in md and "| rag_bm25 |" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    lines = paths["answers"].read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["question"] == "what is Ada ?"


def test_evaluate_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown"):
        ev.evaluate(None, tok, DOCS, QUESTIONS, methods=("oracle",))
    with pytest.raises(ValueError, match=r"questions\[0\]"):
        ev.evaluate(None, tok, DOCS, [{"question": "x"}])
    with pytest.raises(ValueError, match="unknown doc_id"):
        ev.answer_open_book(None, tok, DOCS, [{"doc_id": "zz", "question": "x"}])
    with pytest.raises(ValueError, match="extra must not override"):
        ev.write_report("/tmp/unused", {"a": {"f1": 1.0}}, [], extra={"methods": {}})


def test_markdown_table_percentages():
    table = ev.markdown_table({"base": {"exact_match": 0.5, "f1": 0.25, "contains": 1.0}})
    assert "| base | 50.0 | 25.0 | 100.0 |" in table
