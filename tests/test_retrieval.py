"""pdengine.retrieval: BM25 on bm25s (Lucene scoring), passages, stable ranking."""
import math

import pytest

from pdengine import retrieval as R
from pdengine.errors import InputError


def lucene_bm25(texts, query, k1=1.5, b=0.75):
    """Okapi BM25 as Lucene scores it, written out: what the bm25s index must rank by."""
    docs = [R.terms(t) for t in texts]
    avg = sum(map(len, docs)) / len(docs)
    out = []
    for d in docs:
        s = 0.0
        for t in R.terms(query):
            df = sum(t in x for x in docs)
            if t in d:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                s += idf * d.count(t) / (d.count(t) + k1 * (1 - b + b * len(d) / avg))
        out.append(s)
    return out


TEXTS = ["the cat sat on the mat", "Ada lives in Oslo", "the dog and the cat", "Oslo is cold", "a b c"]


@pytest.mark.parametrize("query", ["where does Ada live in Oslo", "cat", "the the cat", "a", "Oslo Oslo cold"])
def test_scores_are_lucene_bm25(query):
    assert R.PassageIndex(TEXTS).scores(query).tolist() == pytest.approx(lucene_bm25(TEXTS, query), rel=1e-9)


def test_ranks_rare_matching_terms_first_and_ties_keep_passage_order():
    index = R.PassageIndex(TEXTS)
    assert index.top("where does Ada live in Oslo", 2) == [1, 3]
    assert index.top("cat", 2) == [2, 0]  # same tf: the shorter text (5 words vs 6) first
    assert index.top("zebra", 3) == [0, 1, 2]  # no word known: passage order
    assert index.scores("zebra").tolist() == [0.0] * 5
    assert R.PassageIndex(["x y", "y x", "x y"]).top("x", 3) == [0, 1, 2]


def test_length_normalisation():
    s = R.PassageIndex(["oslo", "oslo " + "filler " * 30, "rome"]).scores("oslo")
    assert s[0] > s[1] > s[2] == 0.0


def test_retrieve_splits_long_documents_into_passages():
    docs = [{"id": "long", "text": "alpha " * 10 + "Oslo " + "beta " * 10}, {"id": 7, "text": "Rome Rome"}]
    passages = R.split_passages(docs, passage_words=8)
    assert [p["doc_id"] for p in passages] == ["long"] * 3 + ["7"]
    hits = R.retrieve(docs, [{"question": "Oslo ?"}, {"question": "Rome ?"}], top_n=1, passage_words=8)
    assert hits[0]["doc_ids"] == ["long"] and "Oslo" in hits[0]["context"]
    assert hits[1] == {"context": "Rome Rome", "doc_ids": ["7"]}


def test_bad_inputs_are_input_errors():
    with pytest.raises(InputError, match="top_n"):
        R.retrieve([{"id": "a", "text": "x"}], [{"question": "x"}], top_n=0)
    with pytest.raises(InputError, match="passage_words"):
        R.split_passages([{"id": "a", "text": "x"}], passage_words=0)
    with pytest.raises(InputError, match="duplicate document id 'a'"):
        R.split_passages([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])


def test_demo_questions_retrieve_their_own_document_first():
    """The check made when BM25 moved to bm25s: on the demo's 30 documents and 540 held-out
    questions, the top passage was the same as the former implementation's for every
    question (it is each question's own document)."""
    import json
    from pathlib import Path

    from pdengine.demo.pipeline import ASSETS, demo_world

    world = demo_world(json.loads((Path(ASSETS) / "pretrain.json").read_text()))
    questions = world.eval_questions(per_fact=3, seed=0, n_documents=30)
    hits = R.retrieve(world.new_documents[:30], questions, top_n=1)
    assert len(questions) == 540
    assert [h["doc_ids"][0] for h in hits] == [str(q["doc_id"]) for q in questions]
