"""Teacher prefill: run the teacher once per QA pair and cache its top-k log-probs.

Shared-prefix prefill (docs/DESIGN.md, "Prefill"): the teacher sequences of one document
share a prefix (system prompt + document); it is encoded once, and every QA suffix of that
document attends to it through a block attention mask
(`modeling.segment_attention_mask` with the suffix segments as children of the prefix
segment) with position ids that continue from the end of the prefix. Several documents
are packed into one row of at most `batch_tokens` tokens (the layout: `pdengine.prefill_packing`).
Only the hidden states that predict answer tokens go through the lm_head, inside the
fused `teacher_topk` op.

Durability: items are written in input order in shards of `shard_size` QA pairs; each
shard and then the manifest are replaced atomically, so a killed prefill resumes after
its last complete shard. One prefill at a time writes a cache directory (a DirectoryLock).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pdengine import cache_format, distributed, modeling, prefill_distributed
from pdengine.cache import TeacherCache
from pdengine.config import POSITIVE, check_settings, setting
from pdengine.documents import document_of, index_documents
from pdengine.errors import InputError
from pdengine.fingerprints import model_differences, tokenizer_differences
from pdengine.loading import attention_implementation_of
from pdengine.locking import LOCK_NAME, DirectoryLock
from pdengine.ops.teacher_topk import teacher_topk
from pdengine.prefill_packing import (  # noqa: F401  (re-exported: the row layout is part of prefill's API)
    PATHS, build_row, common_prefix_length, count_tokens, make_groups, pack_rows,
)
from pdengine.prefix_kv import group_answer_hidden
from pdengine.prompts import DEFAULT_FORMAT, PromptFormat, build_example, check_context_length


@dataclass(frozen=True)
class PrefillConfig:
    """Settings of a prefill: the one place their defaults are written (the CLI flags,
    `pdengine run`'s `prefill:` section and `prefill()`'s keywords all come from here)."""

    k: int = setting(64, "top-k log-probs kept per answer token", check=POSITIVE)
    temperature: float = setting(2.0, "distillation temperature of the cached log-probs", check=POSITIVE)
    batch_tokens: int = setting(4096, "tokens per packed teacher row", check=POSITIVE)
    shard_size: int = setting(1024, "QA pairs per shard (the unit of resumption)", check=POSITIVE)
    system: str | None = setting(None, "system prompt of teacher and student prompts")
    student_sees_document: bool = setting(False, "replay cache: the student sequence is the teacher sequence")
    share_prefix: bool = setting(True, "encode each document once for all its QA pairs")
    teacher_attention: str = setting("auto", "how a document's QA pairs attend to it: prefix_kv (the prefix's "
                                     "KV cache; what auto means: measured faster at every length), mask "
                                     "(block-mask rows, kept for comparison)", choices=PATHS)
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self):
        for name in ("k", "batch_tokens", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise InputError(f"temperature must be a positive number, got {self.temperature!r}")
        check_settings(self)


DEFAULT_SHARD_SIZE = PrefillConfig.shard_size


# ---------------------------------------------------------------------------------------
# Inputs


def _answer_ids(qa: dict, n: int, tokenizer) -> list[int]:
    if qa.get("answer_ids") is not None:
        ids = qa["answer_ids"]
        # bool is an int subclass: `[true]` must not be read as token 1
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise InputError(f"qa_pairs[{n}]['answer_ids'] must be a list of non-negative integers, got {ids!r}")
        return list(ids)
    if not isinstance(qa.get("answer"), str):
        raise InputError(f"qa_pairs[{n}] needs 'answer_ids' or an 'answer' string")
    return list(tokenizer(qa["answer"], add_special_tokens=False).input_ids)


def _index(documents) -> dict[str, dict]:
    if not isinstance(documents, (list, tuple, dict)):
        raise InputError(f"documents must be a list of {{'id', 'text'}} objects or a dict id -> text, "
                         f"got {type(documents).__name__}")
    return index_documents(documents)


def build_examples(tokenizer, documents, qa_pairs, fmt=DEFAULT_FORMAT, *, student_sees_document=False,
                   vocab_size=None) -> list[dict]:
    """Teacher/student sequences of every QA pair (prompts.build_example), in input order.

    Documents are indexed by `pdengine.documents` (string ids: `{"id": 1}` is the document
    "1", as in every other stage). With student_sees_document the student sequence is the
    teacher sequence (a self-distillation "replay" item that keeps the open-book skill).
    """
    docs = _index(documents)
    if not isinstance(qa_pairs, (list, tuple)) or not qa_pairs:
        raise InputError("qa_pairs must be a non-empty list of objects")
    examples = []
    for n, qa in enumerate(qa_pairs):
        if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
            raise InputError(f"qa_pairs[{n}] must be an object with a 'question' string")
        doc = document_of(docs, qa, f"qa_pairs[{n}]")
        ex = build_example(tokenizer, doc["text"], qa["question"], _answer_ids(qa, n, tokenizer), fmt)
        if len(ex["teacher_input_ids"]) == ex["answer_start_teacher"]:
            raise InputError(f"qa_pairs[{n}] has an empty answer and the tokenizer no end-of-turn token")
        if vocab_size is not None and max(ex["teacher_input_ids"]) >= vocab_size:
            raise InputError(f"qa_pairs[{n}]: token id {max(ex['teacher_input_ids'])} is outside the "
                             f"model's vocabulary ({vocab_size})")
        if student_sees_document:
            ex["student_input_ids"] = ex["teacher_input_ids"]
            ex["answer_start_student"] = ex["answer_start_teacher"]
        examples.append({**ex, "qa_index": n, "doc_id": str(doc["id"])})
    return examples


# ---------------------------------------------------------------------------------------
# The teacher forward


def _lm_head_weight(model) -> torch.Tensor:
    return modeling.output_layer(model).weight


def _topk(model, hidden, *, k: int, temperature: float):
    weight = _lm_head_weight(model)
    return teacher_topk(hidden.to(weight.dtype), weight, k, temperature, modeling.final_logit_softcap(model))


@torch.inference_mode()
def teacher_rows(model, groups, *, k: int, temperature: float):
    """Top-k (ids, logprobs) `[A, k]` for all answer tokens of `groups`' items, in item
    order, with one block-mask forward per packed row."""
    device = _lm_head_weight(model).device
    row = build_row(groups)
    hidden = modeling.hidden_states(model, row["input_ids"].to(device), row["position_ids"].to(device),
                                    row["attention_mask"].to(device))
    return _topk(model, hidden[0].index_select(0, row["targets"].to(device)), k=k, temperature=temperature)


@torch.inference_mode()
def teacher_prefix_kv(model, group, *, k: int, temperature: float, batch_tokens: int):
    """Top-k (ids, logprobs) `[A, k]` for a prefix-KV group: its prefix encoded once with causal
    attention, its suffixes attending to the cached keys and values (no `[T, T]` mask)."""
    return _topk(model, group_answer_hidden(model, group, batch_tokens), k=k, temperature=temperature)


def _has_sliding_window(config) -> bool:
    if not getattr(config, "sliding_window", None) or not getattr(config, "use_sliding_window", True):
        return False
    return "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])


def teacher_path(model, requested: str) -> str:
    """The path `auto` means: the prefix KV cache, faster than block-mask rows at every
    document length measured (bench/RESULTS.md, "prefill"). Sliding-window models always
    take it: a block mask would override their window."""
    if requested == "auto" or _has_sliding_window(model.config):
        return "prefix_kv"
    return requested


# ---------------------------------------------------------------------------------------
# The cache directory


def _inputs_fingerprint(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["teacher_input_ids"], ex["student_input_ids"], ex["answer_start_teacher"],
                             ex["answer_start_student"]]).encode())
    return h.hexdigest()[:32]


def _new_manifest(model, tokenizer, fmt, examples, settings: PrefillConfig):
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
        "k": settings.k,
        "temperature": float(settings.temperature),
        "softcap": modeling.final_logit_softcap(model),
        "teacher_attention": teacher_path(model, settings.teacher_attention),
        # the kernels the teacher ran with (a field the schema does not name; readers ignore it)
        "attn_implementation": attention_implementation_of(model),
        "student_sees_document": bool(settings.student_sees_document),
        "shard_size": settings.shard_size,
        "total_items": len(examples),
        "encoding": {
            "topk_ids": "topk_ids_packed: id_bits bits per id, little-endian, each row padded to whole bytes",
            "topk_logprobs": "top - span * (code / 255)^2 (square-root companded uint8 gaps below the row's top)",
        },
        "shards": [],
    }


# What must agree for a resumed prefill to continue an existing cache. The model and the
# tokenizer are compared by what identifies them (docs/DESIGN.md, "Cache format"): the same
# model loaded as `data/model` or `/abs/data/model`, in fp32 or bf16, continues its cache.
_RESUME_KEYS = ("inputs_fingerprint", "vocab_size", "k", "temperature", "student_sees_document",
                "shard_size")


def _resume_differences(old: dict, fresh: dict) -> list[str]:
    """Every real difference between an existing cache and this prefill, one phrase each."""
    problems = [f"model: {d}" for d in model_differences(old["model"], fresh["model"])]
    problems += tokenizer_differences(old["tokenizer"], fresh["tokenizer"])
    problems += _template_differences(old["template"], fresh["template"])
    for key in _RESUME_KEYS:
        if old.get(key) != fresh[key]:
            problems.append(f"{key}: cache {old.get(key)!r}, now {fresh[key]!r}")
    return problems


def _template_differences(old: dict, new: dict) -> list[str]:
    if old.get("fingerprint") == new["fingerprint"]:
        return []
    if old.get("format") != new["format"]:
        return [f"prompt format: cache {old.get('format')!r}, now {new['format']!r}"]
    return ["chat template: the tokenizer's chat template is not the one the cache was made with"]


def _resumable_manifest(out_dir: Path, fresh: dict) -> dict | None:
    """The existing manifest to continue from, None when there is none; InputError when it
    was made with other settings (naming each real difference)."""
    if not (out_dir / cache_format.MANIFEST).exists():
        return None
    old = cache_format.read_manifest(out_dir)
    differing = _resume_differences(old, fresh)
    if differing:
        raise InputError(f"{out_dir} holds a teacher cache made with different settings ({'; '.join(differing)}); "
                         f"pass resume=False (CLI: --force) to overwrite it")
    return old


def _is_cache_file(path: Path) -> bool:
    name = path.name
    return name == cache_format.MANIFEST or name.startswith(("shard-", ".shard-", f".{cache_format.MANIFEST}"))


def _clear_cache_dir(out_dir: Path) -> None:
    """Remove what a cache holds, keeping the directory and its lock file (deleting a held
    lock file would let a second process lock a new inode of the same name)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"out_dir {out_dir} exists and is not a directory")
    entries = [p for p in out_dir.iterdir() if p.name != LOCK_NAME]
    others = [p.name for p in entries if not _is_cache_file(p) or not p.is_file()]
    if others:
        raise InputError(f"out_dir {out_dir} holds files that are not part of a teacher cache: {others[:5]}")
    for path in entries:
        path.unlink()


def _remove_stale_temp_files(out_dir: Path) -> None:
    # A kill during an atomic write leaves its temp file behind (io.atomic_write_bytes).
    for tmp in out_dir.glob(".*.tmp"):
        if tmp.name.startswith((".shard-", f".{cache_format.MANIFEST}")):
            tmp.unlink()


# ---------------------------------------------------------------------------------------
# The public entry point

_D = PrefillConfig  # the defaults below are PrefillConfig's, written once there


def prefill(model, tokenizer, documents, qa_pairs, out_dir, *, k=_D.k, temperature=_D.temperature,
            fmt=DEFAULT_FORMAT, batch_tokens=_D.batch_tokens, shard_size=_D.shard_size, resume=True,
            progress=_D.progress, student_sees_document=_D.student_sees_document, share_prefix=_D.share_prefix,
            teacher_attention=_D.teacher_attention):
    """Run the teacher over every QA pair and write its top-k log-probs to a cache.

    Args:
        model, tokenizer: the teacher (a Hugging Face causal LM, used as loaded: bf16 on GPU).
        documents: list of {"id", "text"} dicts or a dict id -> text.
        qa_pairs: list of {"doc_id", "question", "answer_ids"} (or "answer", tokenised once
            when answer_ids is missing); item i of the cache is qa_pairs[i].
        out_dir: the cache directory (locked for the duration: one writer at a time).
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
        teacher_attention: "auto", "mask" or "prefix_kv": how the QA pairs attend to their
            document (see PrefillConfig; docs/DESIGN.md, "Attention paths").

    Returns the TeacherCache. Bad input raises `pdengine.errors.InputError`.
    """
    if not isinstance(fmt, PromptFormat):
        raise InputError(f"fmt must be a pdengine.prompts.PromptFormat, got {type(fmt).__name__}")
    settings = PrefillConfig(k=k, temperature=temperature, batch_tokens=batch_tokens, shard_size=shard_size,
                             system=fmt.system, student_sees_document=student_sees_document,
                             share_prefix=share_prefix, teacher_attention=teacher_attention, progress=progress)
    out_dir = Path(out_dir)
    vocab = cache_format.vocab_size_of(model)
    if k > vocab:
        raise InputError(f"k={k} is larger than the model's vocabulary ({vocab})")
    examples = build_examples(tokenizer, documents, qa_pairs, fmt, student_sees_document=student_sees_document,
                              vocab_size=vocab)
    check_context_length(model, [(ex["doc_id"], len(ex["teacher_input_ids"])) for ex in examples])
    manifest = _new_manifest(model, tokenizer, fmt, examples, settings)
    ctx = distributed.context()
    # Under torchrun rank 0 owns the directory (lock, clearing, manifest); every rank writes its shards.
    with DirectoryLock(out_dir, "pdengine prefill") if ctx.is_main else contextlib.nullcontext():
        if ctx.is_main:
            manifest = _open_for_writing(out_dir, manifest, resume)
        manifest = ctx.broadcast(manifest)
        model.eval()
        _fill_shards(ctx, model, examples, out_dir, manifest, settings)
    return TeacherCache(out_dir)


def _open_for_writing(out_dir: Path, fresh: dict, resume: bool) -> dict:
    """The manifest to continue: the existing one on a compatible resume (with the shards a
    killed multi-rank run finished adopted), else `fresh` in a cleared directory."""
    existing = _resumable_manifest(out_dir, fresh) if resume else None
    if existing is None:
        _clear_cache_dir(out_dir)
        return fresh
    _remove_stale_temp_files(out_dir)
    prefill_distributed.adopt_finished_shards(out_dir, existing,
                                              prefill_distributed.shard_count(existing["total_items"],
                                                                              existing["shard_size"]))
    return existing


def _fill_shards(ctx, model, examples, out_dir, manifest, settings: PrefillConfig):
    from tqdm.auto import tqdm

    shard_size = manifest["shard_size"]
    n_shards = prefill_distributed.shard_count(len(examples), shard_size)
    path = teacher_path(model, settings.teacher_attention)

    def compute_shard(s: int) -> dict:
        chunk = examples[s * shard_size: (s + 1) * shard_size]
        return _shard_of(model, chunk, manifest, batch_tokens=settings.batch_tokens,
                         share_prefix=settings.share_prefix, path=path)

    if ctx.distributed:
        prefill_distributed.fill_shards(ctx, out_dir, manifest, n_shards, compute_shard,
                                        progress=settings.progress and ctx.is_main)
        return
    done = len(manifest["shards"])
    bar = tqdm(total=len(examples), initial=min(done * shard_size, len(examples)), unit="qa",
               desc="teacher prefill", disable=not settings.progress)
    for s in range(done, n_shards):
        manifest["shards"].append(cache_format.write_shard(out_dir, s, compute_shard(s)))
        manifest["complete"] = s == n_shards - 1
        cache_format.write_manifest(out_dir, manifest)
        bar.update(min(shard_size, len(examples) - s * shard_size))
    bar.close()
    if not manifest["complete"]:  # nothing left to do (e.g. an empty resume)
        manifest["complete"] = True
        cache_format.write_manifest(out_dir, manifest)
    prefill_distributed.remove_entries(out_dir)  # left by a killed multi-rank run, now adopted


def _shard_of(model, chunk, manifest, *, batch_tokens, share_prefix, path) -> dict:
    """Run the teacher over one shard's examples; the shard's tensors."""
    groups = make_groups(chunk, batch_tokens, share_prefix, path)
    k, temperature = manifest["k"], manifest["temperature"]
    results, prefixes, items = {}, [], []
    for row in pack_rows([g for g in groups if not g["prefix_kv"]], batch_tokens):
        _collect(results, row, *teacher_rows(model, row, k=k, temperature=temperature))
    for group in (g for g in groups if g["prefix_kv"]):
        _collect(results, [group], *teacher_prefix_kv(model, group, k=k, temperature=temperature,
                                                      batch_tokens=batch_tokens))
    for group in groups:
        prefixes.append(group["items"][0]["teacher_input_ids"][: group["prefix_len"]])
        items += [{**ex, "prefix": len(prefixes) - 1} for ex in group["items"]]
    items.sort(key=lambda it: it["qa_index"])  # shards keep the input order
    topk_ids = torch.cat([results[it["qa_index"]][0] for it in items])
    topk_logprobs = torch.cat([results[it["qa_index"]][1] for it in items])
    return cache_format.shard_tensors(items, prefixes, topk_ids, topk_logprobs, bits=manifest["id_bits"],
                                      student_sees_document=manifest["student_sees_document"])


def _collect(results: dict, groups, ids, logprobs) -> None:
    """Split a forward's `[A, k]` top-k back into its items' answers, keyed by qa_index."""
    offset = 0
    for group in groups:
        for ex in group["items"]:
            n = len(ex["teacher_input_ids"]) - ex["answer_start_teacher"]
            results[ex["qa_index"]] = (ids[offset: offset + n], logprobs[offset: offset + n])
            offset += n


# ---------------------------------------------------------------------------------------
# CLI: pdengine prefill


def add_arguments(parser) -> None:
    """Arguments of `pdengine prefill`: the files, then PrefillConfig's flags."""
    from pdengine.config import add_arguments as add_settings

    from pdengine.loading import add_model_arguments

    add_model_arguments(parser, model_help="local Hugging Face model directory (the teacher)")
    parser.add_argument("--documents", required=True, help="documents JSONL: {id, text}")
    parser.add_argument("--qa", required=True, help="QA pairs JSONL: {doc_id, question, answer, answer_ids}")
    parser.add_argument("--out", required=True, help="cache directory to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing cache instead of resuming")
    add_settings(parser, PrefillConfig)


def run(args) -> int:
    """`pdengine prefill`: load the teacher, prefill, print a summary."""
    from pdengine.config import from_args
    from pdengine.io import read_jsonl
    from pdengine.loading import load_from_args

    settings = from_args(PrefillConfig, args)
    documents = read_jsonl(args.documents, required=("id", "text"))
    qa_pairs = read_jsonl(args.qa, required=("doc_id", "question"))
    model, tokenizer = load_from_args(args)
    cache = prefill(model, tokenizer, documents, qa_pairs, args.out, k=settings.k, temperature=settings.temperature,
                    fmt=PromptFormat(system=settings.system), batch_tokens=settings.batch_tokens,
                    shard_size=settings.shard_size, resume=not args.force, progress=settings.progress,
                    student_sees_document=settings.student_sees_document, share_prefix=settings.share_prefix,
                    teacher_attention=settings.teacher_attention)
    if not distributed.context().is_main:  # under torchrun rank 0 speaks for the job
        return 0
    counts = cache.manifest["counts"]
    print(f"teacher cache {args.out}: {counts['items']} QA pairs, {counts['answer_tokens']} answer tokens, "
          f"{counts['bytes']} bytes ({counts['bytes_per_answer_token']:.1f} B/answer token)")
    return 0

