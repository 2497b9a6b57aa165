"""pdengine.prefix_kv: the prefix-KV teacher forward equals one unshared forward per QA pair."""
import pytest
import torch
import transformers
from helpers import tiny_model

from pdengine import modeling
from pdengine.prefix_kv import group_answer_hidden, suffix_chunks

VOCAB = 64


def gemma2(sliding_window):
    """Gemma 2: soft-capped logits, alternating sliding-window / global attention layers."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=128, sliding_window=sliding_window,
                                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    return transformers.Gemma2ForCausalLM(config).eval()


def models():
    yield "llama", tiny_model("llama", VOCAB, max_position_embeddings=128)
    yield "qwen2", tiny_model("qwen2", VOCAB, tie_word_embeddings=True, max_position_embeddings=128)
    yield "gemma", tiny_model("gemma", VOCAB, max_position_embeddings=128)
    yield "phi3", tiny_model("phi3", VOCAB, max_position_embeddings=128)
    yield "gemma2-sliding", gemma2(sliding_window=6)  # the window is shorter than the prefix


def group(prefix_len=13, n_items=5, seed=0):
    """Items sharing `prefix_len` tokens, then a question and an answer of varied lengths."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, VOCAB, (prefix_len,), generator=gen).tolist()
    items = []
    for i in range(n_items):
        question = torch.randint(3, VOCAB, (2 + i % 3,), generator=gen).tolist()
        answer = torch.randint(3, VOCAB, (1 + (2 * i) % 5,), generator=gen).tolist()
        items.append({"teacher_input_ids": prefix + question + answer,
                      "answer_start_teacher": prefix_len + len(question)})
    return {"prefix_len": prefix_len, "items": items}


def unshared(model, g):
    rows = []
    for ex in g["items"]:
        ids = torch.tensor([ex["teacher_input_ids"]])
        hidden = modeling.hidden_states(model, ids)[0]
        rows.append(hidden[ex["answer_start_teacher"] - 1: len(ex["teacher_input_ids"]) - 1])
    return torch.cat(rows)


@pytest.mark.parametrize("name,model", list(models()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("batch_tokens", [1, 40, 4096])  # one suffix per chunk, a few, all at once
def test_prefix_kv_equals_unshared_forward(name, model, batch_tokens):
    g = group()
    with torch.inference_mode():
        got = group_answer_hidden(model, g, batch_tokens)
        want = unshared(model, g)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_empty_prefix_runs_suffixes_alone():
    model = tiny_model("llama", VOCAB)
    g = group(prefix_len=0)
    with torch.inference_mode():
        torch.testing.assert_close(group_answer_hidden(model, g, 64), unshared(model, g), rtol=1e-5, atol=1e-5)


def test_chunks_respect_the_budget_with_the_prefix_counted():
    assert suffix_chunks([3, 3, 3, 3], prefix_len=10, batch_tokens=26) == [[0, 1], [2, 3]]
    assert suffix_chunks([3, 9, 3], prefix_len=10, batch_tokens=30) == [[0], [1], [2]]
    assert suffix_chunks([5], prefix_len=100, batch_tokens=8) == [[0]]  # at least one suffix
    assert suffix_chunks([2, 2, 2], prefix_len=0, batch_tokens=6) == [[0, 1, 2]]


# ------------------------------------------------------------------ through prefill


def _cache_rows(cache):
    return [(cache[i]["topk_ids"], cache[i]["topk_logprobs"]) for i in range(len(cache))]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefill_paths_agree_and_auto_is_prefix_kv(family, tmp_path):
    from helpers import DOCUMENTS, QA, tiny_model_and_tokenizer

    from pdengine.prefill import build_examples, make_groups, prefill

    model, tok = tiny_model_and_tokenizer(family)
    examples = build_examples(tok, DOCUMENTS, QA)
    small = max(len(ex["teacher_input_ids"]) for ex in examples)  # "ada" (3 pairs) no longer fits one row
    assert [g["prefix_kv"] for g in make_groups(examples, small, path="prefix_kv")] == [True, True]
    assert not any(g["prefix_kv"] for g in make_groups(examples, small, path="mask"))
    caches = {path: prefill(model, tok, DOCUMENTS, QA, tmp_path / path, k=8, progress=False, batch_tokens=small,
                            teacher_attention=path) for path in ("mask", "prefix_kv", "auto")}
    assert caches["auto"].manifest["teacher_attention"] == "prefix_kv"
    for (ids_m, lp_m), (ids_k, lp_k) in zip(_cache_rows(caches["mask"]), _cache_rows(caches["prefix_kv"])):
        span = lp_m[:, :1] - lp_m[:, -1:]
        assert (lp_m - lp_k).abs().le(span / 250 + 1e-4).all()  # the cache's uint8 log-prob encoding
        assert (ids_m == ids_k).float().mean() > 0.95  # ids may differ only at ties
    for a, b in zip(_cache_rows(caches["prefix_kv"]), _cache_rows(caches["auto"])):  # auto is prefix_kv
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
