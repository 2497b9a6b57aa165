"""The one documents index every stage uses (generate, answer, prefill, eval).

Document ids are strings everywhere: an integer id in a JSONL file (`{"id": 1}`) is the
document "1" in every stage, and a QA pair's `doc_id` is matched the same way. Duplicate
ids, missing fields and empty texts are InputErrors that name the document, so a file that
passes `generate` also passes `prefill` and `eval`.
"""
from __future__ import annotations

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
    if key not in index:
        raise InputError(f"{where}: doc_id {key!r} is not among the documents")
    return index[key]
