"""pdengine.chunking: long documents split at sentence boundaries into ID#0, ID#1, ...;
the chunks fit, overlap, tile the original and resolve back to their document."""
import json

import pytest
from helpers import QA_WORDS, bpe_tokenizer, save_tiny, word_tokenizer

from pdengine import cli
from pdengine.chunking import ChunkConfig, chunk_documents, reassemble, token_counter
from pdengine.documents import document_of, index_documents, source_of
from pdengine.errors import InputError
from pdengine.io import write_jsonl

SENTENCE = "Ada lives in Oslo ."  # 5 word tokens


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(QA_WORDS)


def _words(n: int) -> str:
    """`n` word tokens of whole 5-token sentences (n a multiple of 5) plus a remainder."""
    text = " ".join([SENTENCE] * (n // 5))
    return (text + " " + " ".join(["Ada"] * (n % 5))).strip()


def _chunk(docs, tokenizer, chunk_tokens, overlap_tokens=0):
    return chunk_documents(docs, tokenizer, ChunkConfig(chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens))


def test_a_document_exactly_at_the_limit_is_unchanged_one_token_over_is_split(tok):
    at_limit = {"id": "a", "text": _words(20), "title": "kept"}
    assert token_counter(tok)(at_limit["text"]) == 20
    assert _chunk([at_limit], tok, 20) == [at_limit]  # the same document, no source_id
    over = {"id": "a", "text": _words(21), "title": "kept"}
    chunks = _chunk([over], tok, 20)
    assert [c["id"] for c in chunks] == ["a#0", "a#1"]
    assert all(c["source_id"] == "a" and c["title"] == "kept" for c in chunks)
    assert all(token_counter(tok)(c["text"]) <= 20 for c in chunks)


def test_short_documents_pass_unchanged_in_order(tok):
    docs = [{"id": 1, "text": _words(30)}, {"id": "b", "text": SENTENCE}, {"id": "c", "text": _words(12)}]
    out = _chunk(docs, tok, 10)
    assert [c["id"] for c in out] == ["1#0", "1#1", "1#2", "b", "c#0", "c#1"]
    assert out[3] == docs[1]


def test_chunks_end_at_sentence_ends_and_round_trip(tok):
    text = "\n\n".join([" ".join([SENTENCE] * 3)] * 4)  # 4 paragraphs of 3 sentences
    chunks = _chunk([{"id": "d", "text": text}], tok, 12)
    for c in chunks:
        start = c["source_start"]
        assert text[start:start + len(c["text"])] == c["text"]
        assert c["text"].rstrip().endswith(".")  # whole sentences
        assert start == 0 or text[start - 1].isspace()
    assert reassemble(chunks) == text
    assert reassemble(list(reversed(chunks))) == text  # order of the list does not matter
    smaller = _chunk(chunks, tok, 6)  # chunks chunked again still point at the original
    assert {c["source_id"] for c in smaller} == {"d"} and smaller[0]["id"] == "d#0#0"
    assert reassemble(smaller) == text
    with pytest.raises(InputError, match="a chunk of this document is missing"):
        reassemble([chunks[0], chunks[2]])


def test_overlap_is_whole_sentences_of_at_most_overlap_tokens(tok):
    count = token_counter(tok)
    text = " ".join([SENTENCE] * 12)
    chunks = _chunk([{"id": "d", "text": text}], tok, 15, overlap_tokens=5)
    for before, after in zip(chunks, chunks[1:]):
        end = before["source_start"] + len(before["text"])
        assert after["source_start"] < end  # they share text
        shared = text[after["source_start"]:end]
        assert shared.strip() == SENTENCE and count(shared) <= 5
    assert reassemble(chunks) == text
    no_overlap = _chunk([{"id": "d", "text": text}], tok, 15)
    for before, after in zip(no_overlap, no_overlap[1:]):
        assert after["source_start"] == before["source_start"] + len(before["text"])
    assert len(no_overlap) == 4 and len(chunks) > len(no_overlap)


def test_a_sentence_longer_than_a_chunk_is_cut_between_words(tok):
    text = " ".join(["Ada"] * 23) + " ."  # one 24-token sentence
    chunks = _chunk([{"id": "s", "text": text}], tok, 10, overlap_tokens=2)
    assert all(token_counter(tok)(c["text"]) <= 10 for c in chunks)
    assert all(not c["text"].startswith(" ") and (c["source_start"] == 0 or text[c["source_start"] - 1] == " ")
               for c in chunks)
    assert reassemble(chunks) == text


def test_a_word_longer_than_a_chunk_is_cut_between_tokens():
    tokenizer = bpe_tokenizer()
    count = token_counter(tokenizer)
    word = "Adaharbourbridgeswindowmorning" * 3
    text = f"Ada lives in Oslo . {word} . The cat sat ."
    assert count(word) > 8
    chunks = _chunk([{"id": "w", "text": text}], tokenizer, 8, overlap_tokens=2)
    assert all(count(c["text"]) <= 8 for c in chunks)
    assert reassemble(chunks) == text


def test_settings_are_checked():
    with pytest.raises(InputError, match=r"overlap_tokens \(8\) must be smaller than chunk_tokens \(8\)"):
        ChunkConfig(chunk_tokens=8, overlap_tokens=8)
    with pytest.raises(InputError, match="chunk_tokens must be > 0"):
        ChunkConfig(chunk_tokens=0, overlap_tokens=0)
    with pytest.raises(InputError, match="overlap_tokens must be >= 0"):
        ChunkConfig(chunk_tokens=8, overlap_tokens=-1)


def test_a_chunk_id_that_collides_with_a_document_is_refused(tok):
    with pytest.raises(InputError, match="chunk id 'a#0' is also the id of another document"):
        _chunk([{"id": "a", "text": _words(30)}, {"id": "a#0", "text": SENTENCE}], tok, 10)


def test_a_question_about_the_source_resolves_to_the_chunk_it_was_written_from(tok):
    text = "Ada lives in Oslo . Ada works as baker . Bo lives in Rome . Bo works as baker ."
    chunks = _chunk([{"id": "d", "text": text}, {"id": "e", "text": SENTENCE}], tok, 10)
    index = index_documents(chunks)
    assert list(index) == ["d#0", "d#1", "e"]
    rome = document_of(index, {"doc_id": "d", "question": "where does Bo live ?", "answer": "Rome"}, "q")
    assert rome["id"] == "d#1" and source_of(rome) == "d"
    assert document_of(index, {"doc_id": "d#0"}, "q")["id"] == "d#0"  # a question written from a chunk
    assert source_of(index["e"]) == "e"
    with pytest.raises(InputError, match="doc_id 'z' is not among the documents"):
        document_of(index, {"doc_id": "z"}, "q")


def test_chunk_command(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "long", "text": _words(40)}, {"id": "short", "text": SENTENCE}])
    out = tmp_path / "chunks.jsonl"
    assert cli.main(["chunk", "--documents", str(tmp_path / "docs.jsonl"), "--out", str(out), "--model", str(model),
                     "--chunk-tokens", "20", "--overlap-tokens", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["long#0", "long#1", "long#2", "short"]
    assert "1 of 2 split into 3 chunks of <= 20 tokens" in capsys.readouterr().err
    assert cli.main(["chunk", "--documents", str(tmp_path / "docs.jsonl"), "--out", str(out), "--model", str(model),
                     "--chunk-tokens", "4", "--overlap-tokens", "4"]) == 2
    assert "must be smaller than chunk_tokens" in capsys.readouterr().err


def test_evaluation_counts_the_chunks_of_a_document_as_that_document(tok):
    from pdengine.evaluate import check_eval_inputs
    from pdengine.retrieval import retrieve

    text = "Ada lives in Oslo . Ada works as baker . Bo lives in Rome . Bo works as baker ."
    chunks = _chunk([{"id": "d", "text": text}], tok, 10)
    questions = [{"doc_id": "d", "question": "where does Bo live ?", "answer": "Rome"}]
    docs = check_eval_inputs(chunks, questions)  # the question about 'd' finds its document
    assert document_of(docs, questions[0], "q")["text"].startswith("Bo lives in Rome")
    found = retrieve(docs, questions, top_n=1, passage_words=50)[0]["doc_ids"]
    assert [source_of(docs[i]) for i in found] == ["d"]  # a retrieved chunk is the question's own document
