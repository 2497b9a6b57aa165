"""Triton kernel for `teacher_topk`: lm_head GEMM + streaming top-k + log-sum-exp.

For hidden `h [N, d]` and lm_head `W [V, d]`: `z = softcap(h W^T) / temperature`; return
the k largest z per row (ids, sorted descending) and `z_ids - lse(z)`, never storing the
`[N, V]` logits.

Design (two stages, bounded memory):
1. `_chunk_topk_kernel`, one program per (block of BLOCK_N tokens, vocabulary chunk).
   It walks its chunk tile by tile (BLOCK_V ids per tile): the GEMM tile in fp32, an
   online max / sum-of-exp for the chunk's log-sum-exp, and a running top-K of the chunk
   (K = next power of two >= k, unordered). It writes K candidate keys per (token, chunk) and one
   lse per (token, chunk): O(N * n_chunks * K) memory, a few % of N * V.
2. The launcher merges in torch: `topk` over the N x (n_chunks * K) candidate keys and a
   logsumexp over the chunk lse values; O(N * n_chunks * K), no host sync.

A candidate is one int64 *key*: the high 32 bits are the fp32 value z mapped to an int32
that sorts like the float, the low 32 bits are `2^32 - 1 - id`. So a single integer max
finds the largest z, ties going to the smallest id, and torch.topk on keys is the merge.
The running top-K is updated by replace-the-minimum insertion of the tile's keys that
beat the current K-th best (see `_insert_tile`); torch.topk in stage 2 sorts.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from pdengine.kernels._math import logit_tile
from pdengine.kernels._math import tanh as _tanh

_LOW32 = 0xFFFFFFFF
_SIGN_FLIP = 0x7FFFFFFF
# Target vocabulary ids per chunk: bounds the candidate buffer to ~K / _CHUNK_V of N * V
# (1.6 % for k=64) while leaving (N / BLOCK_N) * (V / _CHUNK_V) programs to fill a GPU.
_CHUNK_V = 4096


@triton.jit
def _to_keys(z, vocab_ids, valid):
    """int64 keys ordered like (z descending, id ascending); invalid -> the minimum key."""
    bits = z.to(tl.int32, bitcast=True)
    # negative floats: flip the magnitude bits so that the int32 order is the float order
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    low = tl.full(vocab_ids.shape, 0xFFFFFFFF, tl.int64) - vocab_ids.to(tl.int64)
    keys = (ordered.to(tl.int64) << 32) | low
    min_key = tl.full(keys.shape, -9223372036854775807 - 1, tl.int64)
    return tl.where(valid, keys, min_key)


@triton.jit
def _insert_tile(top, tile_keys):
    """Update `top` [BN, K] (the K largest keys so far, unordered) with `tile_keys` [BN, BV].

    Replace-the-minimum insertion: while some row's best remaining tile key beats that
    row's smallest kept key, swap it in. Keys are unique (distinct ids; the initial
    sentinels are distinct too), so equality picks exactly one slot. The loop runs as
    many rounds as the block's largest number of insertions: K on a chunk's first tile,
    then about K / t on its t-th tile, instead of K rounds on every tile.
    """
    kth = tl.min(top, axis=1)
    tile_best = tl.max(tile_keys, axis=1)
    while tl.max((tile_best > kth).to(tl.int32), axis=0) > 0:
        insert = (tile_best > kth)[:, None] & (top == kth[:, None])
        top = tl.where(insert, tile_best[:, None], top)
        tile_keys = tl.where(tile_keys == tile_best[:, None], -9223372036854775807 - 1, tile_keys)
        kth = tl.min(top, axis=1)
        tile_best = tl.max(tile_keys, axis=1)
    return top


@triton.jit
def _chunk_topk_kernel(
    h_ptr, w_ptr, keys_ptr, lse_ptr,
    N, V, D, n_tiles, tiles_per_chunk, n_chunks, inv_temperature, softcap, stride_h, stride_w,
    SOFTCAP: tl.constexpr, IEEE: tl.constexpr, K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N

    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_N,), tl.float32)
    # distinct sentinels below every real key (see _insert_tile), one per slot
    top = tl.full((BLOCK_N, K), -9223372036854775807 - 1, tl.int64) + tl.arange(0, K)[None, :].to(tl.int64)

    first_tile = chunk * tiles_per_chunk
    for t in range(first_tile, tl.minimum(first_tile + tiles_per_chunk, n_tiles)):
        vocab_ids = t * BLOCK_V + tl.arange(0, BLOCK_V)
        vocab_mask = vocab_ids < V
        # no LoRA on the teacher: the LoRA pointers and strides are never read
        u = logit_tile(h_ptr, w_ptr, h_ptr, w_ptr, rows, vocab_ids, row_mask, vocab_mask,
                       D, 0, stride_h, stride_w, 0, 0,
                       False, IEEE, BLOCK_N, BLOCK_V, BLOCK_D, 16)
        if SOFTCAP:
            u = softcap * _tanh(u / softcap)
        z = tl.where(vocab_mask[None, :], u * inv_temperature, float("-inf"))

        # online log-sum-exp (every chunk holds >= 1 valid id, so the max is finite)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max

        tile_keys = _to_keys(z, vocab_ids[None, :], vocab_mask[None, :] & row_mask[:, None])
        top = _insert_tile(top, tile_keys)

    out_rows = rows.to(tl.int64) * n_chunks + chunk
    tl.store(lse_ptr + out_rows, running_max + tl.log(running_sum), mask=row_mask)
    slots = tl.arange(0, K)
    tl.store(keys_ptr + out_rows[:, None] * K + slots[None, :], top, mask=row_mask[:, None])


def _decode_keys(keys: torch.Tensor):
    """(values fp32, ids int64) from the int64 keys written by the kernel."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ _SIGN_FLIP, ordered)
    values = bits.view(torch.float32)
    ids = _LOW32 - (keys & _LOW32)
    return values, ids


def _block_config(k_pad: int, dtype: torch.dtype, device_type: str):
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps): one fixed config per device kind.

    GPU: the running top-K [BLOCK_N, K] and the tile's keys [BLOCK_N, BLOCK_V] are int64
    in registers, so BLOCK_N shrinks as K grows. These configs compile for sm_90 without
    register spills (ptxas resource usage; see tests), but are not timed on hardware yet.
    Consecutive programs share a vocabulary chunk, so its lm_head rows come from L2.
    CPU interpreter: small blocks keep the interpreted numpy arrays cheap.
    """
    if device_type != "cuda":
        return 16, 128, 64, 4
    block_n = 32 if k_pad <= 128 else 16
    block_d = 64 if dtype in (torch.float16, torch.bfloat16) else 32  # fp32 tiles: twice the bytes
    return block_n, 128, block_d, 8


def _on_device(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the inputs' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def teacher_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, temperature: float, softcap: float):
    """Launcher with the op's schema: `(ids [N, k] int64, logprobs [N, k] float32)`.

    hidden [N, d], weight [V, d] (same dtype and device), 1 <= k <= V, temperature > 0,
    softcap 0.0 for none (checked by the op's one boundary, pdengine/ops/_checks.py).
    Output sorted by descending probability, ties by smaller id.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    if vocab >= 2**31:
        raise ValueError(f"vocabulary size {vocab} does not fit the 32-bit id field of the keys")
    ieee = hidden.dtype in (torch.float32, torch.float64)  # tf32 would reorder near-tied ids
    if hidden.dtype == torch.float64 or (
            hidden.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"):
        # fp64: the contract is fp32 accumulation of fp32 products. bf16 in the interpreter:
        # its bf16 tl.dot returns garbage; bf16 values are exact in fp32 and the kernel
        # accumulates in fp32 anyway, so upcasting computes the same thing
        hidden = hidden.float()
    weight = weight.to(hidden.dtype)  # the dot's operands share hidden's dtype
    hidden, weight = hidden.contiguous(), weight.contiguous()  # logit_tile: unit stride along d
    ids_out = torch.empty((n, k), dtype=torch.int64, device=hidden.device)
    logprobs_out = torch.empty((n, k), dtype=torch.float32, device=hidden.device)
    if n == 0:
        return ids_out, logprobs_out

    k_pad = triton.next_power_of_2(k)
    block_n, block_v, block_d, num_warps = _block_config(k_pad, hidden.dtype, hidden.device.type)
    n_tiles = triton.cdiv(vocab, block_v)
    tiles_per_chunk = triton.cdiv(n_tiles, triton.cdiv(vocab, _CHUNK_V))
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)  # every chunk has >= 1 valid id

    keys = torch.empty((n, n_chunks, k_pad), dtype=torch.int64, device=hidden.device)
    chunk_lse = torch.empty((n, n_chunks), dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(n, block_n), n_chunks)
    with _on_device(hidden.device):
        _chunk_topk_kernel[grid](
            hidden, weight, keys, chunk_lse,
            n, vocab, d, n_tiles, tiles_per_chunk, n_chunks, 1.0 / temperature, float(softcap or 1.0),
            hidden.stride(0), weight.stride(0), SOFTCAP=bool(softcap), IEEE=ieee, K=k_pad,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps,
        )

    best_keys = keys.view(n, n_chunks * k_pad).topk(k, dim=1, sorted=True).values
    values, ids = _decode_keys(best_keys)
    lse = torch.logsumexp(chunk_lse, dim=1, keepdim=True)
    ids_out.copy_(ids)
    logprobs_out.copy_(values - lse)
    return ids_out, logprobs_out
