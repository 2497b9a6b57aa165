"""Teacher prefill: run the teacher once per QA pair and cache its top-k log-probs.

Shared-prefix prefill (DESIGN.md section 5): the teacher sequences of one document share
a prefix (system prompt + document); it is encoded once, and every QA suffix of that
document attends to it through a block attention mask
(`modeling.segment_attention_mask` with the suffix segments as children of the prefix
segment) with position ids that continue from the end of the prefix. Several documents
are packed into one row of at most `batch_tokens` tokens. Only the hidden states that
predict answer tokens go through the lm_head, inside the fused `teacher_topk` op.

Durability: items are written in input order in shards of `shard_size` QA pairs; each
shard and then the manifest are replaced atomically, so a killed prefill resumes after
its last complete shard.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from pdengine import cache as cache_format
from pdengine import modeling
from pdengine.modeling import greedy_pack
from pdengine.ops.teacher_topk import teacher_topk
from pdengine.prompts import DEFAULT_FORMAT, PromptFormat, build_example

DEFAULT_SHARD_SIZE = 1024


# ---------------------------------------------------------------------------------------
# Inputs


def _documents_by_id(documents) -> dict[str, str]:
    if isinstance(documents, dict):
        docs = documents
    elif isinstance(documents, (list, tuple)):
        docs = {}
        for n, row in enumerate(documents):
            if not isinstance(row, dict) or "id" not in row or "text" not in row:
                raise ValueError(f"documents[{n}] must be a dict with 'id' and 'text'")
            if row["id"] in docs:
                raise ValueError(f"documents[{n}]: duplicate document id {row['id']!r}")
            docs[row["id"]] = row["text"]
    else:
        raise ValueError(f"documents must be a list of {{'id', 'text'}} dicts or a dict id -> text, "
                         f"got {type(documents).__name__}")
    for doc_id, text in docs.items():
        if not isinstance(text, str):
            raise ValueError(f"documents: text of document {doc_id!r} must be a str")
    return docs


def _answer_ids(qa: dict, n: int, tokenizer) -> list[int]:
    if qa.get("answer_ids") is not None:
        ids = qa["answer_ids"]
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"qa_pairs[{n}]['answer_ids'] must be a list of non-negative ints")
        return list(ids)
    if not isinstance(qa.get("answer"), str):
        raise ValueError(f"qa_pairs[{n}] needs 'answer_ids' or an 'answer' string")
    return list(tokenizer(qa["answer"], add_special_tokens=False).input_ids)


def build_examples(tokenizer, documents, qa_pairs, fmt=DEFAULT_FORMAT, *, student_sees_document=False,
                   vocab_size=None) -> list[dict]:
    """Teacher/student sequences of every QA pair (prompts.build_example), in input order.

    With student_sees_document the student sequence is the teacher sequence (a
    self-distillation "replay" item that keeps the model's open-book skill).
    """
    docs = _documents_by_id(documents)
    if not isinstance(qa_pairs, (list, tuple)) or not qa_pairs:
        raise ValueError("qa_pairs must be a non-empty list of dicts")
    examples = []
    for n, qa in enumerate(qa_pairs):
        if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
            raise ValueError(f"qa_pairs[{n}] must be a dict with a 'question' string")
        if qa.get("doc_id") not in docs:
            raise ValueError(f"qa_pairs[{n}]: doc_id {qa.get('doc_id')!r} is not among the documents")
        ex = build_example(tokenizer, docs[qa["doc_id"]], qa["question"], _answer_ids(qa, n, tokenizer), fmt)
        if len(ex["teacher_input_ids"]) == ex["answer_start_teacher"]:
            raise ValueError(f"qa_pairs[{n}] has an empty answer and the tokenizer no end-of-turn token")
        if vocab_size is not None and max(ex["teacher_input_ids"]) >= vocab_size:
            raise ValueError(f"qa_pairs[{n}]: token id {max(ex['teacher_input_ids'])} is outside the "
                             f"model's vocabulary ({vocab_size})")
        if student_sees_document:
            ex["student_input_ids"] = ex["teacher_input_ids"]
            ex["answer_start_student"] = ex["answer_start_teacher"]
        examples.append({**ex, "qa_index": n, "doc_id": qa["doc_id"]})
    return examples


# ---------------------------------------------------------------------------------------
# Packing: groups (a prefix + its suffixes) into rows of at most batch_tokens


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


def make_groups(examples, batch_tokens: int, share_prefix: bool = True) -> list[dict]:
    """Split examples into groups {prefix_len, items} that each fit in batch_tokens.

    With share_prefix, a document's items form one group (split when too long for one
    row); without it every item is its own group (one forward per QA pair).
    """
    by_doc: dict[str, list[dict]] = {}
    for ex in examples:
        by_doc.setdefault(ex["doc_id"] if share_prefix else ex["qa_index"], []).append(ex)
    groups = []
    for members in by_doc.values():
        prefix_len = _prefix_length(members)
        sizes = [_suffix_length(ex, prefix_len) for ex in members]
        for part in greedy_pack(sizes, batch_tokens, overhead=prefix_len):
            groups.append(_group([members[i] for i in part]))
    return groups


def _group(items) -> dict:
    # A split-off part of a document recomputes its own (possibly longer) common prefix.
    return {"prefix_len": _prefix_length(items), "items": items}


def _group_tokens(group) -> int:
    return group["prefix_len"] + sum(_suffix_length(ex, group["prefix_len"]) for ex in group["items"])


def pack_rows(groups, batch_tokens: int) -> list[list[dict]]:
    """Consecutive groups packed greedily into rows of at most batch_tokens tokens
    (a single group longer than that gets a row of its own)."""
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


# ---------------------------------------------------------------------------------------
# The teacher forward


def _lm_head_weight(model) -> torch.Tensor:
    head = modeling.output_layer(model)
    weight = getattr(head, "weight", None)
    return weight if weight is not None else head.base_layer.weight


@torch.inference_mode()
def teacher_rows(model, groups, *, k: int, temperature: float):
    """Top-k (ids, logprobs) `[A, k]` for all answer tokens of `groups`' items, in item
    order, with one forward per packed row."""
    device = _lm_head_weight(model).device
    row = build_row(groups)
    hidden = modeling.hidden_states(model, row["input_ids"].to(device), row["position_ids"].to(device),
                                    row["attention_mask"].to(device))
    selected = hidden[0].index_select(0, row["targets"].to(device))
    weight = _lm_head_weight(model)
    return teacher_topk(selected.to(weight.dtype), weight, k, temperature, modeling.final_logit_softcap(model))


def count_tokens(examples, batch_tokens: int, share_prefix: bool = True) -> int:
    """Tokens the teacher processes for these examples (for benchmarks and logs)."""
    return sum(_group_tokens(g) for g in make_groups(examples, batch_tokens, share_prefix))


# ---------------------------------------------------------------------------------------
# The cache directory


def _inputs_fingerprint(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["teacher_input_ids"], ex["student_input_ids"], ex["answer_start_teacher"],
                             ex["answer_start_student"]]).encode())
    return h.hexdigest()[:32]


def _new_manifest(model, tokenizer, fmt, examples, *, k, temperature, shard_size, student_sees_document):
    vocab = cache_format.vocab_size_of(model)
    return {
        "format": cache_format.FORMAT_NAME,
        "format_version": cache_format.FORMAT_VERSION,
        "complete": False,
        "model": cache_format.model_fingerprint(model),
        "tokenizer": cache_format.tokenizer_fingerprint(tokenizer),
        "template": cache_format.template_fingerprint(tokenizer, fmt),
        "inputs_fingerprint": _inputs_fingerprint(examples),
        "vocab_size": vocab,
        "id_bits": cache_format.id_bits(vocab),
        "k": k,
        "temperature": float(temperature),
        "softcap": modeling.final_logit_softcap(model),
        "student_sees_document": bool(student_sees_document),
        "shard_size": shard_size,
        "total_items": len(examples),
        "encoding": {
            "topk_ids": "topk_ids_packed: id_bits bits per id, little-endian, each row padded to whole bytes",
            "topk_logprobs": "top - span * (code / 255)^2 (square-root companded uint8 gaps below the row's top)",
        },
        "shards": [],
    }


# What must agree for a resumed prefill to continue an existing cache.
_RESUME_KEYS = ("format_version", "model", "tokenizer", "template", "inputs_fingerprint", "vocab_size", "k",
                "temperature", "student_sees_document", "shard_size")


def _resumable_manifest(out_dir: Path, fresh: dict) -> dict | None:
    """The existing manifest to continue from, None when there is none; ValueError when it
    was made with other settings."""
    if not (out_dir / cache_format.MANIFEST).exists():
        return None
    old = cache_format.read_manifest(out_dir)
    differing = [key for key in _RESUME_KEYS if old.get(key) != fresh[key]]
    if differing:
        details = "; ".join(f"{key}: cache {_short(old.get(key))}, now {_short(fresh[key])}" for key in differing)
        raise ValueError(f"{out_dir} holds a teacher cache made with different settings ({details}); "
                         f"pass resume=False (CLI: --force) to overwrite it")
    return old


def _short(value):
    return value["fingerprint"] if isinstance(value, dict) and "fingerprint" in value else value


def _clear_cache_dir(out_dir: Path) -> None:
    # Only remove what a cache holds; refuse to wipe a directory with other files.
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    ours = [p for p in out_dir.iterdir() if p.name == cache_format.MANIFEST or
            (p.name.startswith("shard-") or p.name.startswith(".shard-") or p.name.startswith(".manifest"))]
    others = [p.name for p in out_dir.iterdir() if p not in ours]
    if others:
        raise ValueError(f"out_dir {out_dir} holds files that are not part of a teacher cache: {others[:5]}")
    shutil.rmtree(out_dir)


def _remove_stale_temp_files(out_dir: Path) -> None:
    # A kill during an atomic write leaves its temp file behind (io.atomic_write_bytes).
    for tmp in out_dir.glob(".*.tmp"):
        if tmp.name.startswith((".shard-", f".{cache_format.MANIFEST}")):
            tmp.unlink()


def _check_settings(k, temperature, batch_tokens, shard_size, fmt):
    if not isinstance(fmt, PromptFormat):
        raise ValueError(f"fmt must be a pdengine.prompts.PromptFormat, got {type(fmt).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")


# ---------------------------------------------------------------------------------------
# The public entry point


def prefill(model, tokenizer, documents, qa_pairs, out_dir, *, k=64, temperature=2.0, fmt=DEFAULT_FORMAT,
            batch_tokens=4096, shard_size=DEFAULT_SHARD_SIZE, resume=True, progress=True,
            student_sees_document=False, share_prefix=True):
    """Run the teacher over every QA pair and write its top-k log-probs to a cache.

    Args:
        model, tokenizer: the teacher (a Hugging Face causal LM, used as loaded: bf16 on GPU).
        documents: list of {"id", "text"} dicts or a dict id -> text.
        qa_pairs: list of {"doc_id", "question", "answer_ids"} (or "answer", tokenised once
            when answer_ids is missing); item i of the cache is qa_pairs[i].
        out_dir: the cache directory.
        k, temperature: top-k size and the distillation temperature of the log-probs.
        fmt: the PromptFormat of teacher and student prompts.
        batch_tokens: tokens per packed teacher row.
        shard_size: QA pairs per shard (the unit of resumption).
        resume: continue an interrupted cache in out_dir (its settings must match); False
            starts over, deleting the cache already there.
        progress: show a tqdm progress bar.
        student_sees_document: make a "replay" cache whose student sequence is the teacher
            sequence (document included).
        share_prefix: encode each document once for all its QA pairs (False: one forward
            per QA pair; same numbers, for benchmarks and tests).

    Returns the TeacherCache.
    """
    _check_settings(k, temperature, batch_tokens, shard_size, fmt)
    out_dir = Path(out_dir)
    vocab = cache_format.vocab_size_of(model)
    if k > vocab:
        raise ValueError(f"k={k} is larger than the model's vocabulary ({vocab})")
    examples = build_examples(tokenizer, documents, qa_pairs, fmt, student_sees_document=student_sees_document,
                              vocab_size=vocab)
    manifest = _new_manifest(model, tokenizer, fmt, examples, k=k, temperature=temperature,
                             shard_size=shard_size, student_sees_document=student_sees_document)
    existing = _resumable_manifest(out_dir, manifest) if resume else None
    if existing is None:
        _clear_cache_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        manifest = existing
        _remove_stale_temp_files(out_dir)
    model.eval()
    _fill_shards(model, examples, out_dir, manifest, batch_tokens=batch_tokens, progress=progress,
                 share_prefix=share_prefix)
    return cache_format.TeacherCache(out_dir)


def _fill_shards(model, examples, out_dir, manifest, *, batch_tokens, progress, share_prefix):
    from tqdm.auto import tqdm

    shard_size, done = manifest["shard_size"], len(manifest["shards"])
    n_shards = math.ceil(len(examples) / shard_size)
    bar = tqdm(total=len(examples), initial=min(done * shard_size, len(examples)), unit="qa",
               desc="teacher prefill", disable=not progress)
    for s in range(done, n_shards):
        chunk = examples[s * shard_size: (s + 1) * shard_size]
        tensors = _shard_of(model, chunk, manifest, batch_tokens=batch_tokens, share_prefix=share_prefix)
        manifest["shards"].append(cache_format.write_shard(out_dir, s, tensors))
        manifest["complete"] = s == n_shards - 1
        cache_format.write_manifest(out_dir, manifest)
        bar.update(len(chunk))
    bar.close()
    if not manifest["complete"]:  # nothing left to do (e.g. an empty resume)
        manifest["complete"] = True
        cache_format.write_manifest(out_dir, manifest)


def _shard_of(model, chunk, manifest, *, batch_tokens, share_prefix) -> dict:
    """Run the teacher over one shard's examples; the shard's tensors."""
    groups = make_groups(chunk, batch_tokens, share_prefix)
    results, prefixes, items = {}, [], []
    for row in pack_rows(groups, batch_tokens):
        ids, logprobs = teacher_rows(model, row, k=manifest["k"], temperature=manifest["temperature"])
        offset = 0
        for group in row:
            for ex in group["items"]:
                n = len(ex["teacher_input_ids"]) - ex["answer_start_teacher"]
                results[ex["qa_index"]] = (ids[offset: offset + n], logprobs[offset: offset + n])
                offset += n
    for group in groups:
        prefixes.append(group["items"][0]["teacher_input_ids"][: group["prefix_len"]])
        items += [{**ex, "prefix": len(prefixes) - 1} for ex in group["items"]]
    items.sort(key=lambda it: it["qa_index"])  # shards keep the input order
    topk_ids = torch.cat([results[it["qa_index"]][0] for it in items])
    topk_logprobs = torch.cat([results[it["qa_index"]][1] for it in items])
    return cache_format.shard_tensors(items, prefixes, topk_ids, topk_logprobs, bits=manifest["id_bits"],
                                      student_sees_document=manifest["student_sees_document"])


# ---------------------------------------------------------------------------------------
# CLI: pdengine prefill


def add_arguments(parser) -> None:
    """Arguments of `pdengine prefill`."""
    parser.add_argument("--model", required=True, help="local Hugging Face model directory (the teacher)")
    parser.add_argument("--documents", required=True, help="documents JSONL: {id, text}")
    parser.add_argument("--qa", required=True, help="QA pairs JSONL: {doc_id, question, answer, answer_ids}")
    parser.add_argument("--out", required=True, help="cache directory to write")
    parser.add_argument("--k", type=int, default=64, help="top-k log-probs kept per answer token (default 64)")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default 2.0)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per packed teacher row")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="QA pairs per shard")
    parser.add_argument("--system", default=None, help="system prompt of teacher and student prompts")
    parser.add_argument("--student-sees-document", action="store_true",
                        help="replay cache: the student sequence is the teacher sequence")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing cache instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    """`pdengine prefill`: load the teacher, prefill, print a summary."""
    from pdengine.io import read_jsonl
    from pdengine.loading import load_model_and_tokenizer

    documents = read_jsonl(args.documents, required=("id", "text"))
    qa_pairs = read_jsonl(args.qa, required=("doc_id", "question"))
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    cache = prefill(model, tokenizer, documents, qa_pairs, args.out, k=args.k, temperature=args.temperature,
                    fmt=PromptFormat(system=args.system), batch_tokens=args.batch_tokens,
                    shard_size=args.shard_size, resume=not args.force, progress=not args.no_progress,
                    student_sees_document=args.student_sees_document)
    counts = cache.manifest["counts"]
    print(f"teacher cache {args.out}: {counts['items']} QA pairs, {counts['answer_tokens']} answer tokens, "
          f"{counts['bytes']} bytes ({counts['bytes_per_answer_token']:.1f} B/answer token)")
    return 0
