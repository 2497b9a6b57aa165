"""Teacher sequences are checked against the model's context length before it runs: a
document exactly at the limit passes, one token over is an InputError naming the document,
its length and the limit."""
import pytest
from helpers import DOCUMENTS, QA, sentence_word_tokenizer, tiny_model

from pdengine.errors import InputError
from pdengine.prefill import build_examples, prefill
from pdengine.prompts import check_context_length, context_length


def _longest(tok):
    examples = build_examples(tok, DOCUMENTS, QA)
    longest = max(examples, key=lambda ex: len(ex["teacher_input_ids"]))
    return longest["doc_id"], len(longest["teacher_input_ids"])


def _model(tok, limit):
    return tiny_model("llama", vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=limit)


def test_a_document_exactly_at_the_limit_is_prefilled(tmp_path):
    tok = sentence_word_tokenizer()
    _, length = _longest(tok)
    cache = prefill(_model(tok, length), tok, DOCUMENTS, QA, tmp_path, k=4, progress=False)
    assert len(cache) == len(QA)


def test_one_token_over_the_limit_is_refused_before_any_work(tmp_path):
    tok = sentence_word_tokenizer()
    doc_id, length = _longest(tok)
    with pytest.raises(InputError) as info:
        prefill(_model(tok, length - 1), tok, DOCUMENTS, QA, tmp_path / "cache", k=4, progress=False)
    assert str(info.value).startswith(f"document {doc_id!r}: its teacher sequence (prompt + document + question + "
                                      f"answer) is {length} tokens, over the model's context length of {length - 1}")
    assert not (tmp_path / "cache").exists()


def test_the_check_counts_the_generation_budget_and_every_document():
    model = _model(sentence_word_tokenizer(), 100)
    assert context_length(model) == 100 and context_length(model.config) == 100
    check_context_length(model, [("a", 90), ("b", 60)], budget=10)  # 90 + 10 = 100 fits
    with pytest.raises(InputError, match=r"document 'a': its prompt is 101 tokens including 10 tokens to generate, "
                                         r"over the model's context length of 100 .*\(1 more documents"):
        check_context_length(model, [("a", 81), ("a", 91), (2, 95), ("c", 5)], budget=10, what="prompt")
    import types

    check_context_length(types.SimpleNamespace(config=object()), [("a", 10**6)])  # no stated limit: no check
