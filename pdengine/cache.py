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

from pdengine import cache_format
from pdengine.cache_format import check_shard_file, decode_topk, load_shard, read_manifest
from pdengine.errors import InputError
from pdengine.modeling import greedy_pack
from pdengine.training.batching import pack_sequences
from pdengine.training.sources import DataSource

# Re-exported so `from pdengine.cache import ...` of the format's names keeps working while
# callers move to `pdengine.cache_format`.
from pdengine.cache_format import (  # noqa: F401
    FORMAT_NAME, FORMAT_VERSION, MANIFEST, check_compatible, decode_logprobs, encode_logprobs, encode_topk,
    id_bits, model_fingerprint, pack_ids, shard_name, shard_tensors, template_fingerprint, token_dtype,
    tokenizer_fingerprint, unpack_ids, vocab_size_of, write_manifest, write_shard,
)


# ---------------------------------------------------------------------------------------
# Reading


class TeacherCache(DataSource):
    """Read access to a teacher top-k cache written by `pdengine.prefill`.

    `len(cache)` items; `cache[i]` is a dict with `teacher_input_ids`, `student_input_ids`
    (lists of ints), `answer_start_teacher`, `answer_start_student`, `topk_ids [n_ans, k]`
    int64 and `topk_logprobs [n_ans, k]` float32 (row j: the teacher's distribution for
    answer token j); `cache.manifest` is the manifest dict; `cache.batches(...)` yields packed
    student training batches. It is a `pdengine.training.sources.DataSource`.

    Passing `model`, `tokenizer` or `temperature` checks that the cache was made for them
    (InputError naming what differs). Shards load lazily and are verified on first use
    (`cache_format.load_shard`: size, sha256 and layout); a truncated, tampered or corrupt
    shard raises InputError naming the file.
    """

    def __init__(self, path, *, model=None, tokenizer=None, temperature=None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"]:
            raise InputError(f"teacher cache {self.path} is incomplete ({self.manifest['counts']['items']} of "
                             f"{self.manifest['total_items']} items): rerun prefill on it to resume")
        self.check_compatible(model, tokenizer, temperature)
        self.k = int(self.manifest["k"])
        self.id_bits = int(self.manifest["id_bits"])
        self.student_sees_document = bool(self.manifest["student_sees_document"])
        self._shard_starts = [0]
        for entry in self.manifest["shards"]:
            check_shard_file(self.path, entry)  # cheap (size); the content is verified on first load
            self._shard_starts.append(self._shard_starts[-1] + entry["items"])
        self._shards: dict[int, dict] = {}
        self._lengths = None

    def __len__(self) -> int:
        return self._shard_starts[-1]

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.path)!r}, items={len(self)}, k={self.k})"

    def check_compatible(self, model=None, tokenizer=None, temperature=None) -> None:
        """InputError naming everything that differs between the cache and the given objects."""
        cache_format.check_compatible(self.manifest, str(self.path), model=model, tokenizer=tokenizer,
                                      temperature=temperature)

    def identity(self) -> dict:
        """What the cache holds, independent of where it lies: the shards' sha256 and the
        settings they were made with (the path is informative only)."""
        m = self.manifest
        content = hashlib.sha256("".join(entry["sha256"] for entry in m["shards"]).encode())
        return {"path": str(self.path.resolve()), "items": len(self), "k": m["k"], "temperature": m["temperature"],
                "vocab_size": m["vocab_size"], "student_sees_document": m["student_sees_document"],
                "model_fingerprint": m["model"]["fingerprint"], "content": content.hexdigest()[:32]}

    # -- shards ---------------------------------------------------------------------

    def _shard(self, s: int) -> dict:
        if s not in self._shards:
            self._shards[s] = load_shard(self.path, self.manifest, s)
        return self._shards[s]

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
            raise InputError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        lengths = self.student_lengths()
        longest = max(lengths, default=0)
        if longest > batch_tokens:
            raise InputError(f"batch_tokens={batch_tokens} is smaller than the longest student sequence "
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
            raise InputError(f"start must be a non-negative int, got {start!r}")
        plan = self._plan(batch_tokens, seed, epoch, shuffle)[start:]  # bad arguments raise here, not at next()
        return (self._collate(indices) for indices in plan)

    def min_batch_tokens(self) -> int:
        """Batches hold whole sequences: batch_tokens must fit the longest."""
        return max(self.student_lengths())

    def _collate(self, indices: list[int]) -> dict:
        """One packed batch (`training.batching.pack_sequences`) plus the items' top-k rows."""
        sequences, rows = [], []
        for i in indices:
            s, j = self._locate(i)
            shard = self._shard(s)
            seq = self._sequences(shard, j)
            ids, a = torch.tensor(seq["student_input_ids"], dtype=torch.int64), seq["answer_start_student"]
            sequences.append((ids, a, len(ids) - a))
            rows.append(self._topk_rows(shard, j))
        batch = pack_sequences(sequences)
        stored = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
        batch["topk_ids"], batch["topk_logprobs"] = decode_topk(stored, self.k, self.id_bits)
        batch["indices"] = list(indices)
        return batch
