"""The one documents index every stage uses (generate, answer, prefill, eval).

Document ids are strings everywhere: an integer id in a JSONL file (`{"id": 1}`) is the
document "1" in every stage, and a QA pair's `doc_id` is matched the same way. Duplicate
ids, missing fields and empty texts are InputErrors that name the document, so a file that
passes `generate` also passes `prefill` and `eval`.

Chunked documents (pdengine/chunking.py: `ID#0, ID#1, ...`, each with `source_id: ID`)
stay documents of their own; a question whose `doc_id` is the original `ID` resolves to
the chunk of ID it was most likely written from (the one sharing the most words with its
question and answer), and `source_of` names the document a chunk came from.
"""
from __future__ import annotations

import re

from pdengine.errors import InputError


def doc_key(value) -> str:
    """The string id of a document or of a QA pair's `doc_id` (1 and "1" are the same)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"a document id must be a string or an integer, got {value!r}")
    return str(value)


def index_documents(documents, source: str = "documents") -> dict[str, dict]:
    """{id: document} in file order; every document must be {id, text} with non-empty text."""
    if isinstance(documents, dict):  # already an index, e.g. {id: text} or {id: {id, text}}
        documents = [d if isinstance(d, dict) else {"id": k, "text": d} for k, d in documents.items()]
    index: dict[str, dict] = {}
    for i, doc in enumerate(documents):
        where = f"{source}[{i}]"
        if not isinstance(doc, dict) or "id" not in doc or "text" not in doc:
            raise InputError(f"{where} must be an object with 'id' and 'text'")
        key = doc_key(doc["id"])
        if key in index:
            raise InputError(f"{source}: duplicate document id {key!r} (documents[{i}]); ids must be unique")
        if not isinstance(doc["text"], str) or not doc["text"].strip():
            raise InputError(f"{where} (id {key!r}): the text is empty or not a string")
        index[key] = doc
    if not index:
        raise InputError(f"{source} is empty")
    return index


def document_of(index: dict[str, dict], item: dict, where: str) -> dict:
    """The document a question or QA pair `item` refers to by its `doc_id`."""
    if not isinstance(item, dict) or "doc_id" not in item:
        raise InputError(f"{where} must be an object with a 'doc_id'")
    key = doc_key(item["doc_id"])
    if key in index:
        return index[key]
    chunks = [doc for doc in index.values() if str(doc.get("source_id")) == key]
    if chunks:
        return _best_chunk(chunks, item)
    raise InputError(f"{where}: doc_id {key!r} is not among the documents")


def source_of(document: dict) -> str:
    """The id of the document a chunk was cut from (its own id when it is not a chunk)."""
    return doc_key(document.get("source_id", document["id"]))


_WORD = re.compile(r"\w+")


def _best_chunk(chunks: list[dict], item: dict) -> dict:
    """The chunk sharing the most distinct words with the item's question and answer
    (the first such chunk on a tie): the passage a question about the whole document
    was most likely written from, and one that fits the model where the whole may not."""
    wanted = set(_WORD.findall(f"{item.get('question', '')} {item.get('answer', '')}".lower()))
    return max(chunks, key=lambda c: len(wanted & set(_WORD.findall(c["text"].lower()))))
