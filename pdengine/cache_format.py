"""The teacher top-k cache format: encoding, fingerprints, shards and the manifest
(docs/DESIGN.md, "Cache format"; docs/ARCHITECTURE.md).

`pdengine.cache.TeacherCache` reads what this module writes.

A cache is a directory holding `manifest.json` and safetensors shards
`shard-00000.safetensors`, ... written by `pdengine.prefill`. Item i is QA pair i of the
prefill input, in input order; each shard holds a consecutive run of items.

Per shard (n items, A answer tokens, G shared document prefixes):

| tensor | shape | meaning |
| --- | --- | --- |
| `qa_index` | `[n]` int64 | position of the item in the prefill's QA input |
| `prefix_ids`, `prefix_offsets` | flat uint16 (int32 when V > 65536), `[G+1]` int64 | token ids of the shared teacher prefixes |
| `item_prefix` | `[n]` int64 | which prefix item i's teacher sequence starts with |
| `teacher_suffix_ids`, `teacher_suffix_offsets` | flat token ids, `[n+1]` | the rest of each teacher sequence |
| `student_ids`, `student_offsets` | flat token ids, `[n+1]` | student sequences (absent when the student sees the document: then student == teacher) |
| `answer_start_teacher`, `answer_start_student` | `[n]` int64 | index of the first answer token |
| `answer_offsets` | `[n+1]` int64 | item i's rows of the top-k tensors |
| `topk_ids_packed` | `[A, ceil(k*b/8)]` uint8 | the k ids of a row, b = `id_bits` bits each, little-endian bit order |
| `topk_lp_top`, `topk_lp_span` | `[A]` float32 | the row's largest log-prob and the spread `top - smallest` |
| `topk_lp_code` | `[A, k]` uint8 | log-probs, square-root companded (see `encode_logprobs`) |

Storage per answer token at k=64: ids `64 * b / 8` bytes (b = ceil(log2 V): 120 B for a
32k vocabulary, 128 B up to 65536, 136 B for 128k), log-probs 64 + 8 bytes, so 192-208 B.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from pdengine.io import atomic_write_bytes, atomic_write_json

FORMAT_NAME = "pdengine-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_LP_LEVELS = 255  # uint8 code range of the companded log-prob deltas


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------------------------------
# Encoding of the top-k rows


def id_bits(vocab_size: int) -> int:
    """Bits needed to store a token id below vocab_size."""
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_ids(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """`[A, k]` non-negative ids -> `[A, ceil(k*bits/8)]` uint8, `bits` bits per id."""
    shifts = torch.arange(bits, device=ids.device)
    bit_rows = ((ids[..., None] >> shifts) & 1).to(torch.uint8).reshape(ids.shape[0], -1)
    pad = -bit_rows.shape[1] % 8
    bit_rows = torch.nn.functional.pad(bit_rows, (0, pad)).reshape(ids.shape[0], -1, 8)
    weights = (1 << torch.arange(8, device=ids.device)).to(torch.uint8)
    return (bit_rows * weights).sum(-1, dtype=torch.uint8)


def unpack_ids(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of pack_ids: `[A, bytes]` uint8 -> `[A, k]` int64."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bit_rows = ((packed[..., None] >> shifts) & 1).reshape(packed.shape[0], -1)[:, : k * bits]
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int64)
    return (bit_rows.reshape(-1, k, bits).to(torch.int64) * weights).sum(-1)


def encode_logprobs(logprobs: torch.Tensor):
    """`[A, k]` log-probs sorted descending -> (top [A] f32, span [A] f32, code [A, k] u8).

    Each row is stored as its top log-prob plus the gaps `top - lp_j` in [0, span],
    companded as `code = round(255 * sqrt(gap / span))`: the grid is finest near the top of
    the distribution, where the probability mass (and so the loss's sensitivity) is.
    """
    lp = logprobs.float()
    top = lp[:, 0]
    gap = (top[:, None] - lp).clamp(min=0)
    span = gap[:, -1]
    ratio = gap / span.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    code = torch.round(_LP_LEVELS * ratio.clamp(0, 1).sqrt()).to(torch.uint8)
    return top, span, code


def decode_logprobs(top: torch.Tensor, span: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_logprobs (up to the companding error): `[A, k]` float32."""
    ratio = (code.float() / _LP_LEVELS).square()
    return top[:, None] - span[:, None] * ratio


def encode_topk(ids: torch.Tensor, logprobs: torch.Tensor, bits: int) -> dict:
    """The stored form of `[A, k]` top-k rows (see the module docstring)."""
    top, span, code = encode_logprobs(logprobs)
    return {"topk_ids_packed": pack_ids(ids, bits), "topk_lp_top": top, "topk_lp_span": span,
            "topk_lp_code": code}


def decode_topk(rows: dict, k: int, bits: int):
    """`(ids [A, k] int64, logprobs [A, k] float32)` from the stored tensors."""
    ids = unpack_ids(rows["topk_ids_packed"], k, bits)
    return ids, decode_logprobs(rows["topk_lp_top"], rows["topk_lp_span"], rows["topk_lp_code"])


# ---------------------------------------------------------------------------------------
# Fingerprints: what the cache was made with


def _sha256(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _weight_sample(weight: torch.Tensor, n: int = 4096) -> bytes:
    # Rounded to bf16 first, so a bf16 (GPU) and an fp32 (CPU) copy of the same checkpoint
    # share a fingerprint; first and last rows cover both ends of the tensor.
    flat = weight.detach().reshape(-1)
    sample = torch.cat([flat[:n], flat[-n:]]).to("cpu", torch.bfloat16).float()
    return sample.numpy().tobytes()


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "use_cache", "_attn_implementation", "_attn_implementation_autoset",
                         "architectures", "output_hidden_states", "output_attentions", "return_dict"}


def model_fingerprint(model) -> dict:
    """Config (minus keys that do not change outputs) + samples of the embedding and
    lm_head weights; readable fields alongside the hash for error messages."""
    from pdengine.modeling import output_layer

    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    head = output_layer(model)
    head_weight = getattr(head, "weight", None)
    if head_weight is None:  # a LoRA-wrapped lm_head keeps the frozen weight in base_layer
        head_weight = head.base_layer.weight
    digest = _sha256(config, _weight_sample(model.get_input_embeddings().weight),
                     _weight_sample(head_weight))
    return {"fingerprint": digest, "model_type": config.get("model_type"),
            "name_or_path": str(getattr(model.config, "_name_or_path", "") or "")}


def tokenizer_fingerprint(tokenizer) -> dict:
    """Vocabulary + special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {"map": tokenizer.special_tokens_map, "eos": tokenizer.eos_token_id,
                "bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id}
    return {"fingerprint": _sha256(vocab, specials), "size": len(tokenizer),
            "name_or_path": str(getattr(tokenizer, "name_or_path", "") or "")}


def template_fingerprint(tokenizer, fmt) -> dict:
    """Chat template (or the plain template) + PromptFormat."""
    from pdengine.prompts import PLAIN_TEMPLATE

    template = getattr(tokenizer, "chat_template", None) or f"plain:{PLAIN_TEMPLATE}"
    return {"fingerprint": _sha256(template, asdict(fmt)), "chat_template": template != f"plain:{PLAIN_TEMPLATE}",
            "format": asdict(fmt)}


def vocab_size_of(model) -> int:
    """Rows of the lm_head: the support of the teacher's distribution."""
    from pdengine.modeling import output_layer

    head = output_layer(model)
    weight = getattr(head, "weight", None)
    return int((weight if weight is not None else head.base_layer.weight).shape[0])


# ---------------------------------------------------------------------------------------
# Writing (used by pdengine.prefill)


def token_dtype(bits: int) -> torch.dtype:
    """Storage dtype of prompt token ids: 2 bytes when the vocabulary allows."""
    return torch.uint16 if bits <= 16 else torch.int32


def _flat(seqs, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.int64).to(dtype)
    return flat, offsets


def shard_tensors(items, prefixes, topk_ids, topk_logprobs, *, bits, student_sees_document) -> dict:
    """The tensors of one shard.

    items: dicts with qa_index, prefix (index into prefixes), teacher_input_ids,
    student_input_ids, answer_start_teacher, answer_start_student; topk rows `[A, k]`
    for all answer tokens of the items, in item order.
    """
    dtype = token_dtype(bits)
    prefix_ids, prefix_offsets = _flat(prefixes, dtype)
    suffixes = [it["teacher_input_ids"][len(prefixes[it["prefix"]]):] for it in items]
    suffix_ids, suffix_offsets = _flat(suffixes, dtype)
    n_answer = [len(it["student_input_ids"]) - it["answer_start_student"] for it in items]
    answer_offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    answer_offsets[1:] = torch.tensor(n_answer, dtype=torch.int64).cumsum(0)
    tensors = {
        "qa_index": torch.tensor([it["qa_index"] for it in items], dtype=torch.int64),
        "prefix_ids": prefix_ids, "prefix_offsets": prefix_offsets,
        "item_prefix": torch.tensor([it["prefix"] for it in items], dtype=torch.int64),
        "teacher_suffix_ids": suffix_ids, "teacher_suffix_offsets": suffix_offsets,
        "answer_start_teacher": torch.tensor([it["answer_start_teacher"] for it in items], dtype=torch.int64),
        "answer_start_student": torch.tensor([it["answer_start_student"] for it in items], dtype=torch.int64),
        "answer_offsets": answer_offsets,
        **encode_topk(topk_ids.cpu(), topk_logprobs.cpu(), bits),
    }
    if not student_sees_document:
        tensors["student_ids"], tensors["student_offsets"] = _flat([it["student_input_ids"] for it in items], dtype)
    return tensors


def write_shard(directory: Path, index: int, tensors: dict) -> dict:
    """Write a shard atomically; returns its manifest entry (file, items, bytes, sha256)."""
    data = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
    atomic_write_bytes(directory / shard_name(index), data)
    return {"file": shard_name(index), "items": int(tensors["qa_index"].numel()),
            "answer_tokens": int(tensors["topk_lp_top"].numel()), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(directory: Path, manifest: dict) -> None:
    shards = manifest["shards"]
    manifest["counts"] = {
        "shards": len(shards),
        "items": sum(s["items"] for s in shards),
        "answer_tokens": sum(s["answer_tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
    }
    tokens = manifest["counts"]["answer_tokens"]
    manifest["counts"]["bytes_per_answer_token"] = manifest["counts"]["bytes"] / tokens if tokens else None
    atomic_write_json(directory / MANIFEST, manifest)


def read_manifest(directory) -> dict:
    """The manifest dict; ValueError naming the file when missing or unreadable."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{directory} is not a teacher cache: {path} not found")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest.get('format_version')} is not supported "
                         f"(this pdengine reads version {FORMAT_VERSION})")
    return manifest


def check_compatible(manifest: dict, source: str, *, model=None, tokenizer=None, temperature=None) -> None:
    """ValueError naming everything that differs between the cache and the given objects."""
    problems = []
    if model is not None:
        vocab = vocab_size_of(model)
        if vocab != manifest["vocab_size"]:
            problems.append(f"vocab size: cache {manifest['vocab_size']}, model {vocab}")
        fp = model_fingerprint(model)
        if fp["fingerprint"] != manifest["model"]["fingerprint"]:
            problems.append(f"model: cache made with {manifest['model']['model_type']} "
                            f"{manifest['model']['name_or_path']!r} (fingerprint {manifest['model']['fingerprint']}), "
                            f"given {fp['model_type']} {fp['name_or_path']!r} (fingerprint {fp['fingerprint']})")
    if tokenizer is not None:
        fp = tokenizer_fingerprint(tokenizer)
        if fp["fingerprint"] != manifest["tokenizer"]["fingerprint"]:
            cached = manifest["tokenizer"]
            problems.append(f"tokenizer: cache fingerprint {cached['fingerprint']} ({cached['size']} tokens), "
                            f"given {fp['fingerprint']} ({fp['size']} tokens)")
    if temperature is not None and float(temperature) != manifest["temperature"]:
        problems.append(f"temperature: cache {manifest['temperature']}, given {float(temperature)}")
    if problems:
        raise ValueError(f"teacher cache {source} does not match: " + "; ".join(problems))
