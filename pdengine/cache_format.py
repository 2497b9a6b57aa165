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

The manifest is never trusted blindly: `read_manifest` (and `write_manifest`, before it
writes) checks every field's type and range (`_SCHEMA`), that the fields agree (id_bits
with vocab_size, counts and items with the shards), that shard files stay inside the
directory, and a sha256 of the manifest's own content, so a hand edit fails instead of
training on misread data. Each shard entry holds the shard's sha256; `load_shard` checks
it on first read, then the shard's layout against the manifest (k, id_bits, items, answer
tokens, student tensors). Caches of format version 1 (fingerprints with paths, no
manifest checksum) are refused with a message to re-run prefill with --force.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pdengine.errors import InputError
from pdengine.fingerprints import (  # noqa: F401  (what a cache was made with is part of its format)
    check_compatible, model_fingerprint, template_fingerprint, tokenizer_fingerprint, vocab_size_of,
)
from pdengine.io import atomic_write_bytes, atomic_write_text

FORMAT_NAME = "pdengine-teacher-cache"
# 2: fingerprints by content (no paths), a validated manifest with a checksum of itself.
FORMAT_VERSION = 2
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


# ---------------------------------------------------------------------------------------
# The manifest: written by prefill, validated on every read (docs/DESIGN.md, "Cache format")


def _counts(shards: list) -> dict:
    tokens = sum(s["answer_tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    return {"shards": len(shards), "items": sum(s["items"] for s in shards), "answer_tokens": tokens,
            "bytes": total_bytes, "bytes_per_answer_token": total_bytes / tokens if tokens else None}


def _content_checksum(manifest: dict) -> str:
    # Over the canonical JSON of everything but the checksum: a manifest edited by hand (a
    # temperature made to match a flag, a flipped student_sees_document) no longer matches.
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    """Complete `manifest` with its counts and checksum, validate it, write it atomically."""
    manifest["counts"] = _counts(manifest["shards"])
    manifest["checksum"] = _content_checksum(manifest)
    path = Path(directory) / MANIFEST
    validate_manifest(manifest, str(path))  # never write what read_manifest would refuse
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_manifest(directory) -> dict:
    """The validated manifest of the cache in `directory`; InputError naming the file and
    the field when it is missing, unreadable, malformed or inconsistent."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory} is not a teacher cache: {path} not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: corrupt manifest ({e})") from None
    validate_manifest(manifest, str(path))
    for entry in manifest["shards"]:
        shard_path(directory, entry)  # a symlink may lead out of the directory
    return manifest


def validate_manifest(manifest, source: str) -> None:
    """InputError (one line naming `source` and the field) unless `manifest` follows the
    schema below and agrees with itself: counts with shards, id_bits with the vocabulary,
    the checksum with the content."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise InputError(f"{source}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = ("it was made by an older pdengine: re-run prefill on it with --force (resume=False) to rebuild it"
                if _is_int(version) and version < FORMAT_VERSION else f"this pdengine reads version {FORMAT_VERSION}")
        raise InputError(f"{source}: format version {version!r} is not supported ({hint})")
    _check_fields(manifest, _SCHEMA, source, "")
    for name, schema in (("model", _MODEL_SCHEMA), ("tokenizer", _TOKENIZER_SCHEMA), ("template", _TEMPLATE_SCHEMA)):
        _check_fields(manifest[name], schema, source, f"{name}.")
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise InputError(f"{source}: shards[{i}] must be an object, got {entry!r}")
        _check_fields(entry, _SHARD_SCHEMA, source, f"shards[{i}].")
    _check_settings_agree(manifest, source)
    _check_shards_agree(manifest, source)
    if manifest["checksum"] != _content_checksum(manifest):
        raise InputError(f"{source}: checksum does not match the content (the manifest was edited after prefill "
                         "wrote it); re-run prefill with --force to rebuild the cache")


def _is_int(value, low=None, high=None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low) and (high is None or value <= high))


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _is_hex(value, length) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


def _is_str(value) -> bool:
    return isinstance(value, str) and value != ""


# field: (check, what it must be). Fields not named here (e.g. `encoding`, a note for human
# readers) are left alone, so a newer writer may add some.
_SCHEMA = {
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "model": (lambda v: isinstance(v, dict), "an object (the model fingerprint)"),
    "tokenizer": (lambda v: isinstance(v, dict), "an object (the tokenizer fingerprint)"),
    "template": (lambda v: isinstance(v, dict), "an object (the template fingerprint)"),
    "inputs_fingerprint": (_is_str, "a non-empty string"),
    "vocab_size": (lambda v: _is_int(v, 2), "an int >= 2"),
    "id_bits": (lambda v: _is_int(v, 1, 32), "an int from 1 to 32"),
    "k": (lambda v: _is_int(v, 1), "an int >= 1"),
    "temperature": (_is_positive_number, "a finite number > 0"),
    "softcap": (lambda v: v is None or _is_positive_number(v), "null or a finite number > 0"),
    "student_sees_document": (lambda v: isinstance(v, bool), "true or false"),
    "shard_size": (lambda v: _is_int(v, 1), "an int >= 1"),
    "total_items": (lambda v: _is_int(v, 1), "an int >= 1"),
    "shards": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list"),
    "counts": (lambda v: isinstance(v, dict), "an object"),
    "checksum": (lambda v: _is_hex(v, 64), "64 lowercase hex digits"),
}
_MODEL_SCHEMA = {
    "fingerprint": (_is_str, "a non-empty string"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "weights_sha256": (_is_str, "a non-empty string"),
    "vocab_size": (lambda v: _is_int(v, 2), "an int >= 2"),
}
_TOKENIZER_SCHEMA = {"fingerprint": (_is_str, "a non-empty string"), "size": (lambda v: _is_int(v, 1), "an int >= 1")}
_TEMPLATE_SCHEMA = {"fingerprint": (_is_str, "a non-empty string")}
_SHARD_SCHEMA = {
    "file": (lambda v: _is_str(v) and _stays_inside(v), "a file name inside the cache directory"),
    "items": (lambda v: _is_int(v, 1), "an int >= 1"),
    "answer_tokens": (lambda v: _is_int(v, 0), "an int >= 0"),
    "bytes": (lambda v: _is_int(v, 1), "an int >= 1"),
    "sha256": (lambda v: _is_hex(v, 64), "64 lowercase hex digits"),
}


def _check_fields(obj: dict, schema: dict, source: str, prefix: str) -> None:
    for field, (check, expected) in schema.items():
        if field not in obj:
            raise InputError(f"{source}: {prefix}{field} is missing (must be {expected})")
        if not check(obj[field]):
            raise InputError(f"{source}: {prefix}{field} must be {expected}, got {_shown(obj[field])}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _stays_inside(name: str) -> bool:
    # A relative path with no `..`: absolute paths and `../x` would read outside the cache.
    parts = Path(name).parts
    return not Path(name).is_absolute() and "\\" not in name and ".." not in parts and bool(parts)


def _check_settings_agree(m: dict, source: str) -> None:
    vocab = m["vocab_size"]
    if m["id_bits"] != id_bits(vocab):
        raise InputError(f"{source}: id_bits is {m['id_bits']}, but a vocabulary of {vocab} tokens "
                         f"needs {id_bits(vocab)}")
    if m["k"] > vocab:
        raise InputError(f"{source}: k is {m['k']}, larger than the vocabulary ({vocab} tokens)")
    if m["model"]["vocab_size"] != vocab:
        raise InputError(f"{source}: model.vocab_size is {m['model']['vocab_size']}, vocab_size is {vocab}")


def _check_shards_agree(m: dict, source: str) -> None:
    shards, size, total = m["shards"], m["shard_size"], m["total_items"]
    for i, entry in enumerate(shards):
        last = i == len(shards) - 1 and m["complete"]
        if entry["items"] > size or (not last and entry["items"] != size):
            raise InputError(f"{source}: shards[{i}].items is {entry['items']}, but shard_size is {size} "
                             f"(every shard but the last of a complete cache holds exactly shard_size items)")
    items = sum(entry["items"] for entry in shards)
    if items > total or (m["complete"] and items != total):
        state = "complete" if m["complete"] else "incomplete"
        raise InputError(f"{source}: the shards hold {items} items, total_items is {total} ({state} cache)")
    counts = _counts(shards)
    for field, value in counts.items():
        if m["counts"].get(field) != value:
            raise InputError(f"{source}: counts.{field} is {_shown(m['counts'].get(field))}, "
                             f"the shards say {value}")


# ---------------------------------------------------------------------------------------
# Shards: located inside the cache, verified on first read


def shard_path(directory, entry: dict) -> Path:
    """The shard's file; InputError when its name, or a symlink, leads out of `directory`."""
    directory = Path(directory)
    path = directory / entry["file"]
    if not _stays_inside(entry["file"]) or not path.resolve().is_relative_to(directory.resolve()):
        raise InputError(f"{directory / MANIFEST}: shard file {entry['file']!r} lies outside the cache directory")
    return path


def check_shard_file(directory, entry: dict) -> Path:
    """The shard's file when it exists with the size the manifest records (a cheap check
    for opening a cache; `verify_shard` checks the content)."""
    path = shard_path(directory, entry)
    if not path.is_file():
        raise InputError(f"teacher cache shard {path} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise InputError(f"teacher cache shard {path} is truncated or corrupt "
                         f"({size} bytes, the manifest says {entry['bytes']})")
    return path


def verify_shard(directory, entry: dict) -> bytes:
    """The shard's bytes, once their size and sha256 match the manifest entry."""
    path = check_shard_file(directory, entry)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise InputError(f"teacher cache shard {path} is corrupt (sha256 does not match the manifest)")
    return data


def load_shard(directory, manifest: dict, index: int) -> dict:
    """Shard `index`'s tensors: checksum verified, then its layout checked against the
    manifest (tensor names, k, id_bits, items, answer tokens), so a manifest that does
    not describe its shards fails here instead of training on misread data."""
    entry = manifest["shards"][index]
    path = shard_path(directory, entry)
    try:
        tensors = load_safetensors(verify_shard(directory, entry))
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error type
        raise InputError(f"teacher cache shard {path} is corrupt: {e}") from None
    _check_shard_layout(tensors, manifest, entry, f"teacher cache shard {path}")
    return tensors


_SHARD_TENSORS = {"qa_index", "prefix_ids", "prefix_offsets", "item_prefix", "teacher_suffix_ids",
                  "teacher_suffix_offsets", "answer_start_teacher", "answer_start_student", "answer_offsets",
                  "topk_ids_packed", "topk_lp_top", "topk_lp_span", "topk_lp_code"}
_STUDENT_TENSORS = {"student_ids", "student_offsets"}


def _check_shard_layout(tensors: dict, manifest: dict, entry: dict, where: str) -> None:
    expected = _SHARD_TENSORS | (set() if manifest["student_sees_document"] else _STUDENT_TENSORS)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise InputError(f"{where} does not match the manifest (student_sees_document="
                         f"{str(manifest['student_sees_document']).lower()}): missing {missing}, unexpected {extra}")
    n, rows = tensors["qa_index"].numel(), tensors["topk_lp_top"].numel()
    k, bits = manifest["k"], manifest["id_bits"]
    shapes = {"items": (n, entry["items"]), "answer_tokens": (rows, entry["answer_tokens"]),
              "k (topk_lp_code columns)": (tuple(tensors["topk_lp_code"].shape), (rows, k)),
              "k and id_bits (topk_ids_packed bytes per row)":
                  (tuple(tensors["topk_ids_packed"].shape), (rows, math.ceil(k * bits / 8))),
              "answer_offsets": (int(tensors["answer_offsets"][-1]), rows)}
    for field, (found, recorded) in shapes.items():
        if found != recorded:
            raise InputError(f"{where} does not match the manifest: {field} is {recorded} in the manifest, "
                             f"{found} in the shard")
    if tensors["prefix_ids"].dtype != token_dtype(bits):
        raise InputError(f"{where} does not match the manifest: id_bits {bits} means {token_dtype(bits)} "
                         f"token ids, the shard holds {tensors['prefix_ids'].dtype}")
