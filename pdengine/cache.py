"""Read access to the on-disk teacher top-k cache (docs/DESIGN.md, "Cache format").

The format itself (tensor layout, encoding, fingerprints, manifest) lives in
`pdengine.cache_format`; this module reads it.
"""
from __future__ import annotations

import bisect
import hashlib
import random
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from pdengine.cache_format import decode_topk, read_manifest, check_compatible
from pdengine.modeling import greedy_pack

# Re-exported so `from pdengine.cache import ...` of the format's names keeps working while
# callers move to `pdengine.cache_format`.
from pdengine.cache_format import (  # noqa: F401
    FORMAT_NAME, FORMAT_VERSION, MANIFEST, decode_logprobs, encode_logprobs, encode_topk, id_bits,
    model_fingerprint, pack_ids, shard_name, shard_tensors, template_fingerprint, token_dtype,
    tokenizer_fingerprint, unpack_ids, vocab_size_of, write_manifest, write_shard,
)


# ---------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """Read access to a teacher top-k cache written by `pdengine.prefill`.

    `len(cache)` items; `cache[i]` is a dict with `teacher_input_ids`, `student_input_ids`
    (lists of ints), `answer_start_teacher`, `answer_start_student`, `topk_ids [n_ans, k]`
    int64 and `topk_logprobs [n_ans, k]` float32 (row j: the teacher's distribution for
    answer token j); `cache.manifest` is the manifest dict; `cache.batches(...)` yields packed
    student training batches.

    Passing `model`, `tokenizer` or `temperature` checks that the cache was made for them
    (ValueError naming what differs). Shards load lazily and are verified (size and sha256)
    on first use; a truncated or corrupt shard raises ValueError naming the file.
    """

    def __init__(self, path, *, model=None, tokenizer=None, temperature=None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise ValueError(f"teacher cache {self.path} is incomplete ({self.manifest['counts']['items']} of "
                             f"{self.manifest['total_items']} items): rerun prefill on it to resume")
        check_compatible(self.manifest, str(self.path), model=model, tokenizer=tokenizer, temperature=temperature)
        self.k = int(self.manifest["k"])
        self.id_bits = int(self.manifest["id_bits"])
        self.student_sees_document = bool(self.manifest["student_sees_document"])
        self._shard_starts = [0]
        for entry in self.manifest["shards"]:
            self._check_shard_file(entry)
            self._shard_starts.append(self._shard_starts[-1] + entry["items"])
        self._shards: dict[int, dict] = {}
        self._lengths = None

    def __len__(self) -> int:
        return self._shard_starts[-1]

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.path)!r}, items={len(self)}, k={self.k})"

    # -- shards ---------------------------------------------------------------------

    def _check_shard_file(self, entry) -> Path:
        file = self.path / entry["file"]
        if not file.is_file():
            raise ValueError(f"teacher cache shard {file} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"teacher cache shard {file} is truncated or corrupt "
                             f"({size} bytes, the manifest says {entry['bytes']})")
        return file

    def _shard(self, s: int) -> dict:
        if s not in self._shards:
            self._shards[s] = self._load_shard(self.manifest["shards"][s])
        return self._shards[s]

    def _load_shard(self, entry) -> dict:
        file = self._check_shard_file(entry)
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"teacher cache shard {file} is corrupt (sha256 does not match the manifest)")
        try:
            return load_safetensors(data)
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"teacher cache shard {file} is corrupt: {e}") from None

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"cache index must be an int, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"cache index {i} out of range for {n} items")
        s = bisect.bisect_right(self._shard_starts, i) - 1
        return s, i - self._shard_starts[s]

    # -- items ----------------------------------------------------------------------

    def _sequences(self, shard: dict, j: int) -> dict:
        p = int(shard["item_prefix"][j])
        prefix = shard["prefix_ids"][shard["prefix_offsets"][p]: shard["prefix_offsets"][p + 1]]
        suffix = shard["teacher_suffix_ids"][shard["teacher_suffix_offsets"][j]: shard["teacher_suffix_offsets"][j + 1]]
        teacher = torch.cat([prefix, suffix]).tolist()
        if self.student_sees_document:
            student, student_start = teacher, int(shard["answer_start_teacher"][j])
        else:
            lo, hi = shard["student_offsets"][j], shard["student_offsets"][j + 1]
            student, student_start = shard["student_ids"][lo:hi].tolist(), int(shard["answer_start_student"][j])
        return {"teacher_input_ids": teacher, "student_input_ids": student,
                "answer_start_teacher": int(shard["answer_start_teacher"][j]),
                "answer_start_student": student_start}

    def _topk_rows(self, shard: dict, j: int) -> dict:
        lo, hi = int(shard["answer_offsets"][j]), int(shard["answer_offsets"][j + 1])
        return {key: shard[key][lo:hi] for key in ("topk_ids_packed", "topk_lp_top", "topk_lp_span", "topk_lp_code")}

    def __getitem__(self, i: int) -> dict:
        s, j = self._locate(i)
        shard = self._shard(s)
        item = self._sequences(shard, j)
        item["topk_ids"], item["topk_logprobs"] = decode_topk(self._topk_rows(shard, j), self.k, self.id_bits)
        item["qa_index"] = int(shard["qa_index"][j])
        return item

    # -- packed student batches --------------------------------------------------------

    def student_lengths(self) -> list[int]:
        """Length of every item's student sequence (loads all shards once)."""
        if self._lengths is None:
            lengths = []
            for s in range(len(self.manifest["shards"])):
                shard = self._shard(s)
                if self.student_sees_document:
                    prefix_len = shard["prefix_offsets"].diff()[shard["item_prefix"]]
                    lengths += (prefix_len + shard["teacher_suffix_offsets"].diff()).tolist()
                else:
                    lengths += shard["student_offsets"].diff().tolist()
            self._lengths = lengths
        return self._lengths

    def _plan(self, batch_tokens: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
        """Items of each batch: a pure function of (batch_tokens, seed, epoch, shuffle).

        Items in a shuffled order are packed greedily: a batch takes the next item while its
        total stays within batch_tokens, so each batch wastes less than one sequence.
        """
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        lengths = self.student_lengths()
        longest = max(lengths, default=0)
        if longest > batch_tokens:
            raise ValueError(f"batch_tokens={batch_tokens} is smaller than the longest student sequence "
                             f"({longest} tokens)")
        order = list(range(len(lengths)))
        if shuffle:
            random.Random(f"{seed}/{epoch}").shuffle(order)
        groups = greedy_pack([lengths[i] for i in order], batch_tokens)
        return [[order[j] for j in group] for group in groups]

    def num_batches(self, batch_tokens: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True) -> int:
        """How many batches `batches` yields for these arguments (with start=0)."""
        return len(self._plan(batch_tokens, seed, epoch, shuffle))

    def batches(self, batch_tokens: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True, start: int = 0):
        """Packed student batches (table in docs/ARCHITECTURE.md), at most batch_tokens each.

        Yields dicts: input_ids/position_ids `[1, T]`, segment_ids `[T]`, target_positions
        and labels `[M]`, topk_ids/topk_logprobs `[M, k]`, indices (cache items). `start`
        skips that many batches (to resume an epoch).
        """
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        plan = self._plan(batch_tokens, seed, epoch, shuffle)[start:]  # bad arguments raise here, not at next()
        return (self._collate(indices) for indices in plan)

    def _collate(self, indices: list[int]) -> dict:
        input_ids, positions, segments, targets, labels, rows = [], [], [], [], [], []
        offset = 0
        for seg, i in enumerate(indices):
            s, j = self._locate(i)
            shard = self._shard(s)
            seq = self._sequences(shard, j)
            ids, a = torch.tensor(seq["student_input_ids"], dtype=torch.int64), seq["answer_start_student"]
            input_ids.append(ids)
            positions.append(torch.arange(len(ids)))
            segments.append(torch.full((len(ids),), seg, dtype=torch.int64))
            targets.append(offset + a - 1 + torch.arange(len(ids) - a))
            labels.append(ids[a:])
            rows.append(self._topk_rows(shard, j))
            offset += len(ids)
        stored = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
        topk_ids, topk_logprobs = decode_topk(stored, self.k, self.id_bits)
        return {"input_ids": torch.cat(input_ids)[None], "position_ids": torch.cat(positions)[None],
                "segment_ids": torch.cat(segments), "target_positions": torch.cat(targets),
                "labels": torch.cat(labels), "topk_ids": topk_ids, "topk_logprobs": topk_logprobs,
                "indices": list(indices)}
