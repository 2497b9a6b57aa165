"""pdengine.input_checks: each check's counts, its one warning line, and its errors."""
import io

import pytest

from helpers import QA_DOCS, bpe_tokenizer, qa_tokenizer
from pdengine import input_checks as IC
from pdengine.errors import InputError


def _run(check, *args, **kwargs):
    stream = io.StringIO()
    report = check(*args, stream=stream, **kwargs)
    return report, stream.getvalue()


# ---------------------------------------------------------------- <unk>


def test_unknown_tokens_counted_exactly_and_warned_with_counts():
    tok = qa_tokenizer()  # word-level: any word outside QA_WORDS is <unk>
    docs = [{"id": "d1", "text": "Ada lives in Oslo . Zed lives in Lima ."}]  # 2 unknown of 10
    report, err = _run(IC.check_unknown_tokens, tok, docs, [{"doc_id": "d1", "question": "who lives in Oslo ?"}])
    assert report.counts["documents_unknown_tokens"] == 2 and report.counts["documents_tokens"] == 10
    assert report.counts["questions_unknown_tokens"] == 0
    assert err.count("\n") == 1 and "2 of 10 tokens (20.0 %) of the documents are '<unk>'" in err
    assert err.startswith("input: warning:")


def test_unknown_tokens_below_threshold_is_silent():
    report, err = _run(IC.check_unknown_tokens, qa_tokenizer(), QA_DOCS)
    assert report.ok and err == "" and report.counts["documents_share"] == 0.0


def test_unknown_tokens_in_questions_warned_separately():
    questions = [{"doc_id": "d1", "question": "who is Zed ?"}]
    report, err = _run(IC.check_unknown_tokens, qa_tokenizer(), QA_DOCS, questions, stage="generate")
    assert "1 of 4 tokens (25.0 %) of the questions" in err and err.startswith("generate: warning:")
    assert "documents are" not in err


def test_mostly_unknown_text_is_an_input_error():
    docs = [{"id": "x", "text": "Ада живёт в Осло ."}]  # Cyrillic: 4 of 5 words unknown
    with pytest.raises(InputError, match=r"4 of 5 tokens \(80.0 %\) of the documents .*cannot read"):
        IC.check_unknown_tokens(qa_tokenizer(), docs, stream=io.StringIO())


def test_tokenizer_without_unknown_token_never_warns():
    tok = bpe_tokenizer()
    tok.unk_token = None
    report, err = _run(IC.check_unknown_tokens, tok, [{"id": "a", "text": "Ada lives in Oslo"}])
    assert err == "" and report.counts["documents_unknown_tokens"] == 0 and report.counts["documents_tokens"] > 0


# ---------------------------------------------------------------- questions per document


def test_questions_per_document_shortfall_counted():
    docs = [{"id": i, "text": "t"} for i in (1, 2, 3)]
    questions = [{"doc_id": "1", "question": f"q{i}?"} for i in range(3)] + [{"doc_id": 2, "question": "q?"}]
    report, err = _run(IC.check_questions_per_document, docs, questions, 3)
    assert report.counts["documents_short"] == 2 and report.counts["documents_without_questions"] == 1
    assert report.counts["fewest"] == 0 and report.counts["questions"] == 4
    assert "2 of 3 documents have fewer than 3 questions (4 of 9; fewest 0; 1 with none: '3')" in err


def test_questions_per_document_met_is_silent():
    docs = [{"id": "a", "text": "t"}]
    report, err = _run(IC.check_questions_per_document, docs, [{"doc_id": "a", "question": "q?"}] * 2, 2)
    assert report.ok and err == ""


# ---------------------------------------------------------------- answers


def _pair(answer, ids, **extra):
    return {"doc_id": "d1", "question": "q?", "answer": answer, "answer_ids": ids, **extra}


def test_empty_and_truncated_answers_dropped_and_counted():
    rows = [_pair("Oslo", [5]), _pair("", []), _pair("  ", [3]), _pair("a b c d", [1, 2, 3, 4]),
            _pair("x", [7], truncated=True)]
    report, err = _run(IC.check_answers, rows, max_new_tokens=4)
    assert report.kept == [rows[0]]
    assert report.counts == {"answers": 5, "empty": 2, "truncated": 2, "dropped": 4, "kept": 1}
    assert "2 of 5 answers empty, 2 cut off at max_new_tokens=4; dropped 4" in err


def test_truncated_answers_kept_when_asked():
    rows = [_pair("Oslo", [5]), _pair("a b", [1, 2])]
    report, err = _run(IC.check_answers, rows, max_new_tokens=2, keep_truncated=True)
    assert report.kept == rows and report.counts["dropped"] == 0 and "(kept: keep_truncated)" in err


def test_answer_shorter_than_the_budget_is_not_truncated():
    report, err = _run(IC.check_answers, [_pair("a b", [1, 2])], max_new_tokens=3)
    assert report.counts["truncated"] == 0 and err == ""


def test_all_answers_unusable_is_an_input_error():
    with pytest.raises(InputError, match="all 2 answers are empty or cut off"):
        IC.check_answers([_pair("", []), _pair("a", [1])], max_new_tokens=1, stream=io.StringIO())


# ---------------------------------------------------------------- near duplicates


def test_near_duplicates_by_normalised_text_and_overlap_within_a_document():
    questions = [
        {"doc_id": "a", "question": "Where does Ada live?"},
        {"doc_id": "a", "question": "where does ADA live ?!"},         # same normalised text
        {"doc_id": "a", "question": "Where does Ada live now?"},       # 4/5 = 0.8 overlap
        {"doc_id": "a", "question": "What does Ada do for a living?"},  # different
        {"doc_id": "b", "question": "Where does Ada live?"},           # other document: not compared
    ]
    assert IC.near_duplicate_pairs(questions) == [(0, 1), (0, 2), (1, 2)]
    report, err = _run(IC.check_near_duplicates, questions)
    assert report.counts["near_duplicates"] == 2 and report.counts["documents"] == 1
    assert "2 of 5 questions repeat another of their document" in err
    assert IC.near_duplicate_pairs(questions, overlap=0.9) == [(0, 1)]


def test_token_overlap():
    assert IC.token_overlap("Where is Oslo?", "where IS oslo") == 1.0
    assert IC.token_overlap("a b", "c d") == 0.0
    assert IC.token_overlap("a b c", "a b") == pytest.approx(2 / 3)


def test_distinct_questions_are_silent():
    questions = [{"doc_id": 1, "question": "Where does Ada live?"}, {"doc_id": 1, "question": "Who is Bo?"}]
    report, err = _run(IC.check_near_duplicates, questions)
    assert report.ok and err == "" and report.counts["near_duplicates"] == 0


def test_warnings_go_to_stderr_by_default(capsys):
    IC.check_questions_per_document(QA_DOCS, [{"doc_id": "d1", "question": "q"}], 1)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "warning" in captured.err


def test_unknown_token_counts_batch_many_texts():
    tok = qa_tokenizer()
    texts = ["Ada lives in Oslo", "Zed lives in Lima"] * 300  # more than one tokenizer batch
    assert IC.unknown_token_counts(tok, texts) == (600, 2400)
