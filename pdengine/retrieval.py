"""BM25 retrieval for the RAG baselines (docs/DESIGN.md, "Evaluation"), on `bm25s`.

Documents are cut into passages of at most `passage_words` words; each question gets the
top passages over all documents. Scoring is Okapi BM25 as Lucene computes it (k1 = 1.5,
b = 0.75, idf = log(1 + (N - df + .5) / (df + .5))), with terms = lower-cased `\\w+` runs
and no stop words or stemming, so one-letter words and "the" count as they did in the
implementation this replaces. The ranking sorts the full score vector with ties broken
by passage order (earlier first): bm25s's own top-k does not promise an order among equal
scores, and a question whose words occur nowhere must still get the same passages on
every run.
"""
from __future__ import annotations

import re

import numpy as np

from pdengine.documents import index_documents
from pdengine.errors import InputError

_TERM = re.compile(r"\w+")


def terms(text: str) -> list[str]:
    """The words BM25 matches on: lower-cased runs of letters, digits and underscores."""
    return _TERM.findall(text.lower())


def split_passages(documents, passage_words: int = 200) -> list[dict]:
    """Documents cut into passages of at most `passage_words` words: `[{doc_id, text}]`.
    A document that is short enough stays one passage, with its formatting intact."""
    if isinstance(passage_words, bool) or not isinstance(passage_words, int) or passage_words < 1:
        raise InputError(f"passage_words must be a positive integer, got {passage_words!r}")
    passages = []
    for doc_id, doc in index_documents(documents).items():
        words = doc["text"].split()
        if len(words) <= passage_words:
            passages.append({"doc_id": doc_id, "text": doc["text"]})
            continue
        for start in range(0, len(words), passage_words):
            passages.append({"doc_id": doc_id, "text": " ".join(words[start:start + passage_words])})
    return passages


class PassageIndex:
    """A bm25s index over passages; `top(query, n)` gives passage indices, best first."""

    def __init__(self, texts: list[str], *, k1: float = 1.5, b: float = 0.75):
        import bm25s

        if not texts:
            raise InputError("retrieval: there are no passages to index")
        self.size = len(texts)
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
        self._bm25.index([terms(t) for t in texts], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every passage for `query` (0 where no query word occurs)."""
        known = [t for t in terms(query) if t in self._bm25.vocab_dict]
        if not known:  # bm25s would look up its empty-string placeholder token instead
            return np.zeros(self.size)
        return np.asarray(self._bm25.get_scores(known), dtype=np.float64)

    def top(self, query: str, n: int) -> list[int]:
        """Indices of the n best passages, best first; equal scores keep passage order."""
        order = np.argsort(-self.scores(query), kind="stable")
        return [int(i) for i in order[:n]]


def retrieve(documents, questions: list[dict], *, top_n: int = 3, passage_words: int = 200) -> list[dict]:
    """For each question, the BM25 top-`top_n` passages: `[{context, doc_ids}]`
    (`context` = the passages joined by blank lines, best first)."""
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise InputError(f"top_n must be a positive integer, got {top_n!r}")
    passages = split_passages(documents, passage_words)
    index = PassageIndex([p["text"] for p in passages])
    out = []
    for q in questions:
        best = [passages[i] for i in index.top(q["question"], top_n)]
        out.append({"context": "\n\n".join(p["text"] for p in best), "doc_ids": [p["doc_id"] for p in best]})
    return out
