"""The packed student batch: one packer for the trainer's examples and the teacher cache.

A batch lays its sequences end to end in one row (docs/ARCHITECTURE.md, "Teacher cache", the
batch table; docs/DESIGN.md, "Training"): positions restart at 0 for every sequence,
`segment_ids` say which sequence a token belongs to (the block mask keeps sequences
apart) and `target_positions` are the tokens whose next-token distribution is trained,
the ones just before each answer token. `pack_sequences` builds that layout;
`TeacherCache` (its `batches`) and `pack_examples` (plain lists of examples) only add
the teacher's top-k rows.
"""
from __future__ import annotations

import torch

from pdengine.errors import InputError


def as_long(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


def pack_sequences(sequences) -> dict:
    """The packed layout of `(input_ids [L] int64, answer_start, n_answer)` triples.

    Returns input_ids / position_ids `[1, T]`, segment_ids `[T]`, target_positions and
    labels `[M]` (M = the answer tokens of all sequences, in order)."""
    ids, positions, segments, targets, labels = [], [], [], [], []
    offset = 0
    for n, (seq, start, n_answer) in enumerate(sequences):
        ids.append(seq)
        positions.append(torch.arange(len(seq)))
        segments.append(torch.full((len(seq),), n, dtype=torch.long))
        targets.append(offset + start - 1 + torch.arange(n_answer))
        labels.append(seq[start : start + n_answer])
        offset += len(seq)
    if not ids:
        raise InputError("cannot pack an empty list of examples")
    return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions)[None],
            "segment_ids": torch.cat(segments), "target_positions": torch.cat(targets),
            "labels": torch.cat(labels)}


def item_sequence(item: dict):
    """(input_ids, answer_start, topk_ids | None, topk_logprobs | None) of one example:
    a cache item (student side) or a plain `{"input_ids", "answer_start"}` example."""
    if not isinstance(item, dict):
        raise InputError(f"each example must be a dict, got {type(item).__name__}")
    if "student_input_ids" in item:
        ids = as_long(item["student_input_ids"])
        return ids, int(item["answer_start_student"]), item["topk_ids"], item["topk_logprobs"]
    if "input_ids" in item and "answer_start" in item:
        return as_long(item["input_ids"]), int(item["answer_start"]), None, None
    raise InputError(
        "each example must be a cache item (student_input_ids, answer_start_student, topk_ids, "
        f"topk_logprobs) or a dict with input_ids and answer_start; got keys {sorted(item)}")


def pack_examples(items, indices=None) -> dict:
    """Pack examples end to end into one student batch (the layout of `pack_sequences`).

    Cache items give their teacher top-k; plain examples get k = 1 targets (their own next
    token, log-prob 0), i.e. cross-entropy. Mixing the two in one batch is refused.
    """
    sequences, tk_ids, tk_lp, kinds = [], [], [], set()
    for n, item in enumerate(items):
        seq, start, top_ids, top_lp = item_sequence(item)
        kinds.add(top_ids is None)
        n_ans = len(seq) - start if top_ids is None else int(torch.as_tensor(top_ids).shape[0])
        if start < 1 or n_ans < 1 or start + n_ans > len(seq):
            raise InputError(f"example {n}: answer_start {start} does not fit a sequence of {len(seq)} tokens")
        if top_ids is None:
            top_ids, top_lp = seq[start:, None], torch.zeros(n_ans, 1)
        sequences.append((seq, start, n_ans))
        tk_ids.append(torch.as_tensor(top_ids, dtype=torch.long))
        tk_lp.append(torch.as_tensor(top_lp, dtype=torch.float32))
    batch = pack_sequences(sequences)
    if len(kinds) > 1 or len({t.shape[1] for t in tk_ids}) != 1:
        raise InputError("cache items and plain examples (or different top-k sizes) cannot share a batch")
    batch.update(topk_ids=torch.cat(tk_ids), topk_logprobs=torch.cat(tk_lp),
                 indices=list(indices) if indices is not None else list(range(len(sequences))))
    if True in kinds:
        batch["cross_entropy_only"] = True  # plain examples have no teacher distribution
    return batch


def pack_teacher(items) -> dict:
    """Teacher sequences of cache items (for online_kl) as right-padded rows `[B, L]` with
    an attention mask: teacher sequences are long (document + question + answer), and
    rows keep attention per sequence instead of a `[T, T]` mask over one packed row.
    `target_positions` index the flattened `B * L` positions."""
    seqs = [as_long(item["teacher_input_ids"]) for item in items]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = []
    for row, (seq, item) in enumerate(zip(seqs, items)):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
        start = int(item["answer_start_teacher"])
        n_ans = int(torch.as_tensor(item["topk_ids"]).shape[0])
        targets.append(row * width + start - 1 + torch.arange(n_ans))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_positions": torch.cat(targets)}


def mix_seed(*parts) -> int:
    """A deterministic 63-bit seed from integers (data order, dropout, per step)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
