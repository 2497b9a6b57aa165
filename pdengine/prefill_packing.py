"""Prefill's row layout: a document's QA pairs as one group (the shared prefix + every
suffix), groups packed into rows of at most `batch_tokens`, and the block attention mask
that lets each suffix see only its own prefix (docs/DESIGN.md, "Prefill").
"""
from __future__ import annotations

import torch

from pdengine import modeling
from pdengine.modeling import greedy_pack


def common_prefix_length(seqs) -> int:
    """Length of the longest common token prefix of seqs."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for other in seqs[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


def _prefix_length(examples) -> int:
    # The shared prefix stops before the first answer-predicting position of every item
    # (position answer_start - 1), so each item's predictions all lie in its own suffix.
    lcp = common_prefix_length([ex["teacher_input_ids"] for ex in examples])
    return max(0, min([lcp] + [ex["answer_start_teacher"] - 1 for ex in examples]))


def _suffix_length(ex, prefix_len) -> int:
    # The last token predicts nothing, so it is not run.
    return len(ex["teacher_input_ids"]) - 1 - prefix_len


PATHS = ("auto", "mask", "prefix_kv")


def make_groups(examples, batch_tokens: int, share_prefix: bool = True, path: str = "mask") -> list[dict]:
    """Split examples into groups {prefix_len, items, prefix_kv}.

    With share_prefix a document's items form one group. How the teacher runs it (`path`):
    "prefix_kv": the whole document is one group whose prefix is encoded once and kept as a
    KV cache (pdengine/prefix_kv.py); "mask": block-mask rows, the document split into
    several groups (each re-encoding its prefix) when it does not fit one row of
    batch_tokens. Without share_prefix every item is its own group.
    """
    by_doc: dict[str, list[dict]] = {}
    for ex in examples:
        by_doc.setdefault(ex["doc_id"] if share_prefix else ex["qa_index"], []).append(ex)
    groups = []
    for members in by_doc.values():
        prefix_len = _prefix_length(members)
        sizes = [_suffix_length(ex, prefix_len) for ex in members]
        if share_prefix and path == "prefix_kv":
            groups.append({**_group(members), "prefix_kv": True})
            continue
        for part in greedy_pack(sizes, batch_tokens, overhead=prefix_len):
            groups.append(_group([members[i] for i in part]))
    return groups


def _group(items) -> dict:
    # A split-off part of a document recomputes its own (possibly longer) common prefix.
    return {"prefix_len": _prefix_length(items), "items": items, "prefix_kv": False}


def _group_tokens(group) -> int:
    return group["prefix_len"] + sum(_suffix_length(ex, group["prefix_len"]) for ex in group["items"])


def pack_rows(groups, batch_tokens: int) -> list[list[dict]]:
    """Consecutive block-mask groups packed greedily into rows of at most batch_tokens tokens
    (a single group longer than that gets a row of its own). Prefix-KV groups run alone."""
    if any(g.get("prefix_kv") for g in groups):
        raise ValueError("prefix-KV groups are not packed into block-mask rows")
    parts = greedy_pack([_group_tokens(group) for group in groups], batch_tokens)
    return [[groups[i] for i in part] for part in parts]


def build_row(groups) -> dict:
    """One packed row: input_ids/position_ids [1, T], the block mask, and for every item the
    row positions whose hidden states predict its answer tokens."""
    ids, positions, segments, parent, targets = [], [], [], [], []
    for group in groups:
        p = group["prefix_len"]
        prefix_segment = len(parent)
        parent.append(-1)
        first = group["items"][0]["teacher_input_ids"]
        ids += first[:p]
        positions += range(p)
        segments += [prefix_segment] * p
        for ex in group["items"]:
            seq, n_suffix = ex["teacher_input_ids"], _suffix_length(ex, p)
            start = len(ids)
            segments += [len(parent)] * n_suffix
            parent.append(prefix_segment)
            ids += seq[p: p + n_suffix]
            positions += range(p, p + n_suffix)
            first_target = start + ex["answer_start_teacher"] - 1 - p
            targets += range(first_target, first_target + len(seq) - ex["answer_start_teacher"])
    segment_ids = torch.tensor(segments, dtype=torch.int64)
    return {"input_ids": torch.tensor([ids], dtype=torch.int64),
            "position_ids": torch.tensor([positions], dtype=torch.int64),
            "attention_mask": modeling.segment_attention_mask(segment_ids, parent=parent),
            "targets": torch.tensor(targets, dtype=torch.int64)}


def count_tokens(examples, batch_tokens: int, share_prefix: bool = True, path: str = "mask") -> int:
    """Tokens the teacher processes for these examples (for benchmarks and logs)."""
    return sum(_group_tokens(g) for g in make_groups(examples, batch_tokens, share_prefix, path))
