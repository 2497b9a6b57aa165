"""Shared-prefix teacher forward through the model's own KV cache: no `[T, T]` mask anywhere.

A document's QA pairs share one teacher prefix (system prompt + document). The prefix is
encoded once with plain causal attention (sdpa's causal kernel, flash on GPU: no mask), its
KV cache is kept, and the QA suffixes then attend to it in chunks of about `batch_tokens`:

- packed (the default): a chunk's suffixes run end to end as one row whose mask is
  `[S, P + S]` (the whole prefix, then causal within each suffix): linear in the prefix
  length, and the prefix KV is read once per chunk, not once per suffix;
- batched (models with sliding-window layers): one right-padded row per suffix on the prefix
  cache *expanded* over the batch (a stride-0 view). The model's own cache then applies the
  window, which an explicit packed mask would override. With causal attention a real token
  never sees a pad (pads come after it), so no padding mask is needed.

Memory is O(prefix + one chunk) whatever the document's length; no `[T, T]` tensor exists.
Results equal one unshared forward per QA pair up to float rounding (tests/test_prefix_kv.py).
See docs/DESIGN.md, "Attention paths".
"""
from __future__ import annotations

import copy
import inspect

import torch
from transformers.cache_utils import DynamicCache

from pdengine import modeling


def _expanded(cache: DynamicCache, batch: int) -> DynamicCache:
    """A cache for `batch` sequences that all continue the one cached prefix (views, no copy)."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        view = copy.copy(layer)  # keeps sliding-window lengths and flags
        view.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
        view.values = layer.values.expand(batch, *layer.values.shape[1:])
        out.layers.append(view)
    return out


def suffix_chunks(suffix_lengths: list[int], prefix_len: int, batch_tokens: int) -> list[list[int]]:
    """Consecutive suffixes grouped so that each chunk's padded batch, counted with the
    prefix it attends to, stays within `batch_tokens` (a chunk has at least one suffix)."""
    chunks, current, longest = [], [], 0
    for i, n in enumerate(suffix_lengths):
        wider = max(longest, n)
        if current and (len(current) + 1) * (prefix_len + wider) > batch_tokens:
            chunks.append(current)
            current, wider = [], n
        current.append(i)
        longest = wider
    if current:
        chunks.append(current)
    return chunks


def _cache_argument(body, cache) -> dict:
    """The keyword that hands a KV cache to the body: `cache` in transformers >= 5.2x,
    `past_key_values` before (still accepted, with a deprecation warning, for a while)."""
    name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    return {name: cache}


def encode_prefix(model, prefix_ids: list[int], device) -> DynamicCache | None:
    """The KV cache of the shared prefix (None for an empty prefix)."""
    if not prefix_ids:
        return None
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix_ids], dtype=torch.long, device=device)
    body = modeling.model_body(model)
    body(input_ids=ids, use_cache=True, **_cache_argument(body, cache))
    return cache


def _has_sliding_layers(cache: DynamicCache) -> bool:
    return any(getattr(layer, "is_sliding", False) for layer in cache.layers)


def packed_suffix_hidden(model, cache: DynamicCache | None, prefix_len: int, suffixes: list[list[int]],
                         device) -> torch.Tensor:
    """Hidden states `[S, d]` of `suffixes` packed end to end in one row after the cached prefix.

    The mask is `[S, P + S]`: every suffix token sees the whole prefix and the earlier tokens of
    its own suffix. Linear in the prefix, and the prefix KV is read once, not once per suffix."""
    ids = torch.tensor([[t for s in suffixes for t in s]], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(prefix_len, prefix_len + len(s), device=device) for s in suffixes])
    segment = torch.cat([torch.full((len(s),), i, device=device) for i, s in enumerate(suffixes)])
    own = (segment[:, None] == segment[None, :]).tril()
    sees_prefix = torch.ones(len(segment), prefix_len, dtype=torch.bool, device=device)
    mask = torch.cat([sees_prefix, own], dim=1)[None, None]
    past = _expanded(cache, 1) if cache is not None else None
    body = modeling.model_body(model)
    out = body(input_ids=ids, position_ids=positions[None], attention_mask=mask, use_cache=past is not None,
               **_cache_argument(body, past))
    return out.last_hidden_state[0]


def batched_suffix_hidden(model, cache: DynamicCache | None, prefix_len: int, suffixes: list[list[int]],
                          device) -> torch.Tensor:
    """Hidden states `[B, S, d]` of right-padded `suffixes`, one batch row each, continuing the
    cached prefix. Needed for sliding-window layers, whose cache keeps only the last window of
    the prefix (a packed row's explicit mask would override their window)."""
    width = max(len(s) for s in suffixes)
    ids = torch.zeros(len(suffixes), width, dtype=torch.long, device=device)
    for row, s in enumerate(suffixes):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
    positions = torch.arange(prefix_len, prefix_len + width, device=device).expand(len(suffixes), -1)
    past = _expanded(cache, len(suffixes)) if cache is not None else None
    body = modeling.model_body(model)
    out = body(input_ids=ids, position_ids=positions, use_cache=past is not None, **_cache_argument(body, past))
    return out.last_hidden_state


def _answer_rows(ex: dict, prefix_len: int) -> slice:
    """Where, in an item's suffix, the hidden states that predict its answer tokens lie."""
    first = ex["answer_start_teacher"] - 1 - prefix_len
    return slice(first, len(ex["teacher_input_ids"]) - 1 - prefix_len)


def group_answer_hidden(model, group: dict, batch_tokens: int) -> torch.Tensor:
    """Hidden states `[A, d]` predicting every answer token of `group`'s items, in item order.

    `group` is {"prefix_len": P, "items": [example, ...]}, items sharing their first P teacher
    tokens (pdengine.prefill.make_groups). Suffixes run in chunks of about `batch_tokens` tokens."""
    device = next(model.parameters()).device
    p, items = group["prefix_len"], group["items"]
    cache = encode_prefix(model, items[0]["teacher_input_ids"][:p], device)
    # The last token of a sequence predicts nothing, so it is not run.
    suffixes = [ex["teacher_input_ids"][p:-1] for ex in items]
    picked = []
    if cache is not None and _has_sliding_layers(cache):
        for chunk in suffix_chunks([len(s) for s in suffixes], p, batch_tokens):
            hidden = batched_suffix_hidden(model, cache, p, [suffixes[i] for i in chunk], device)
            picked += [hidden[row][_answer_rows(items[i], p)] for row, i in enumerate(chunk)]
        return torch.cat(picked)
    for chunk in modeling.greedy_pack([len(s) for s in suffixes], batch_tokens):
        hidden = packed_suffix_hidden(model, cache, p, [suffixes[i] for i in chunk], device)
        offset = 0
        for i in chunk:
            rows = _answer_rows(items[i], p)
            picked.append(hidden[offset + rows.start: offset + rows.stop])
            offset += len(suffixes[i])
    return torch.cat(picked)
