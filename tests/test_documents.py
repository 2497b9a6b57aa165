"""pdengine.documents: one index, string ids, clear errors."""
import pytest

from pdengine.documents import document_of, doc_key, index_documents
from pdengine.errors import InputError


def test_integer_and_string_ids_are_the_same_document():
    index = index_documents([{"id": 1, "text": "a"}, {"id": "b", "text": "c"}])
    assert list(index) == ["1", "b"]
    assert document_of(index, {"doc_id": "1"}, "qa[0]")["text"] == "a"
    assert document_of(index, {"doc_id": 1}, "qa[0]")["text"] == "a"


@pytest.mark.parametrize("docs,needle", [
    ([{"id": 1, "text": "a"}, {"id": "1", "text": "b"}], "duplicate document id '1'"),
    ([{"id": "a", "text": "  "}], r"documents\[0\] \(id 'a'\): the text is empty"),
    ([{"id": "a"}], "must be an object with 'id' and 'text'"),
    ([{"id": True, "text": "x"}], "must be a string or an integer"),
    ([], "documents is empty"),
])
def test_bad_documents(docs, needle):
    with pytest.raises(InputError, match=needle):
        index_documents(docs)


def test_unknown_doc_id_names_the_item():
    with pytest.raises(InputError, match=r"qa\[3\]: doc_id 'z' is not among the documents"):
        document_of(index_documents([{"id": "a", "text": "x"}]), {"doc_id": "z"}, "qa[3]")
    assert doc_key(7) == "7"
