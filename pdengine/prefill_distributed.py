"""Prefill across torchrun ranks: shards computed round-robin, one manifest written by rank 0.

A shard is the unit: shard s holds QA pairs [s * shard_size, (s + 1) * shard_size) and is
computed by rank s % N exactly as one process computes it, so the cache is bit-identical
whatever N. Each finished shard leaves an *entry file* next to it (`shard-00003.entry.json`,
written atomically after the shard), so a killed job resumes with the same or another N:
finished shards are adopted in order, the rest are recomputed. Rank 0 writes the manifest
once every rank has passed the final barrier. See docs/DESIGN.md, "Distributed".
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pdengine import cache_format
from pdengine.errors import InputError
from pdengine.io import atomic_write_json


def entry_path(out_dir: Path, index: int) -> Path:
    return out_dir / cache_format.shard_name(index).replace(".safetensors", ".entry.json")


def write_entry(out_dir: Path, index: int, entry: dict) -> None:
    atomic_write_json(entry_path(out_dir, index), entry)


def finished_entry(out_dir: Path, index: int) -> dict | None:
    """The entry of shard `index` if it was finished and its file still matches it."""
    path = entry_path(out_dir, index)
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        cache_format.verify_shard(out_dir, entry)
    except (ValueError, KeyError, TypeError, OSError, InputError):
        return None  # torn or stale: the shard is recomputed
    return entry


def adopt_finished_shards(out_dir: Path, manifest: dict, n_shards: int) -> None:
    """Append to the manifest, in order, the shards a killed (multi-rank) run finished."""
    while len(manifest["shards"]) < n_shards:
        entry = finished_entry(out_dir, len(manifest["shards"]))
        if entry is None:
            return
        manifest["shards"].append(entry)


def fill_shards(ctx, out_dir: Path, manifest: dict, n_shards: int, compute_shard, *, progress: bool) -> None:
    """Compute this rank's unfinished shards (`compute_shard(s)` -> tensors), then, on rank 0,
    write the complete manifest. Every rank returns after the last barrier. Only rank 0
    shows progress (its own shards)."""
    from tqdm.auto import tqdm

    mine = [s for s in ctx.my_units(n_shards)
            if s >= len(manifest["shards"]) and finished_entry(out_dir, s) is None]
    for s in tqdm(mine, unit="shard", desc=f"teacher prefill (rank 0 of {ctx.world_size})", disable=not progress):
        write_entry(out_dir, s, cache_format.write_shard(out_dir, s, compute_shard(s)))
    ctx.barrier()
    if ctx.is_main:
        adopt_finished_shards(out_dir, manifest, n_shards)
        if len(manifest["shards"]) != n_shards:
            raise RuntimeError(f"prefill: {n_shards - len(manifest['shards'])} shards were finished by no rank")
        manifest["complete"] = True
        cache_format.write_manifest(out_dir, manifest)
        remove_entries(out_dir)
    ctx.barrier()


def remove_entries(out_dir: Path) -> None:
    """Once the manifest lists every shard, the entry files have served their purpose."""
    for path in out_dir.glob("shard-*.entry.json"):
        path.unlink()


def shard_count(n_items: int, shard_size: int) -> int:
    return math.ceil(n_items / shard_size)
