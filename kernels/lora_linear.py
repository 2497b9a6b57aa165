"""Triton kernels of the fused LoRA linear (docs/DESIGN.md, "LoRA matmul").

Forward  `y = x W^T (+ bias) + s (dropout(x) A^T) B^T`:
  1. `_mm_kernel`:         xa_s = s * dropout(x) A^T              [N, r]   (small)
  2. `_extended_k_kernel`: y = [x, xa_s] @ [W, B]^T (+ bias)      one GEMM over K = d_in + r
Backward (W frozen):
  dyB_s = s * dy B [N, r];  dx = [dy, dyB_s] @ [W; A]  (the LoRA half of the sum masked by
  the dropout keep-mask, so it is a second accumulator when dropout is on);
  dA = dyB_s^T dropout(x);  dB = s * dy^T xa  (xa recomputed, never saved). dA and dB
  reduce over all N tokens into few tiles, so on a GPU they split K across programs and
  add atomically into fp32 buffers (`_split_k`).

Dropout: the keep-mask is a hash of (seed, flat index of x) computed inside the kernels
that read x (`_keep`, bit-exact with `pdengine.reference.dropout_keep_mask`); dropped
elements are zeroed on load and 1/(1-p) is applied to the fp32 accumulator, so neither a
mask nor a dropped copy of x is ever stored. All products accumulate in fp32; operands
of tl.dot are in x's dtype (LoRA factors are cast to it: r * (d_in + d_out) elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdengine.kernels._math import dot

_HASH_SEED_MUL = 0x85EBCA6B
_HASH_OFFSET = 0x27D4EB2F


@triton.jit
def _keep(flat_index, seed_mix, threshold):
    """Dropout keep-mask of pdengine.reference.dropout_keep_mask, in uint32 arithmetic.

    seed_mix = (seed * 0x85EBCA6B + 0x27D4EB2F) mod 2**32 is folded on the host.
    """
    h = flat_index.to(tl.uint32) * 0x9E3779B1 + seed_mix.to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return (h >> 8) >= threshold


@triton.jit(do_not_specialize=["alpha", "seed_mix", "threshold", "k_per_split"])
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    alpha, seed_mix, threshold, x_cols, k_per_split,
    DROP_A: tl.constexpr, DROP_B: tl.constexpr, IEEE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C = alpha * op(A) @ op(B), op = dropout's zeroing when DROP_A / DROP_B (that operand
    is x, with flat index row * x_cols + col in x's own [N, d_in] layout).

    SPLIT_K > 1: program (m, n, s) sums K in [s * k_per_split, (s+1) * k_per_split) and
    atomically adds into C (fp32/fp64, zero-initialised): dA and dB reduce over all N
    tokens into few output tiles, which alone would leave most SMs idle.
    """
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < k_end)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0)
        if DROP_A:
            keep = _keep(offs_m[:, None] * x_cols + offs_k[None, :], seed_mix, threshold)
            a = tl.where(keep, a, tl.zeros_like(a))
        b_mask = (offs_k[:, None] < k_end) & (offs_n[None, :] < N)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn, mask=b_mask, other=0.0)
        if DROP_B:
            keep = _keep(offs_k[:, None] * x_cols + offs_n[None, :], seed_mix, threshold)
            b = tl.where(keep, b, tl.zeros_like(b))
        acc = dot(a, b, acc, IEEE)
    acc = acc * alpha
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if SPLIT_K > 1:
        tl.atomic_add(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, offs_m, offs_n, M, N, K,
                stride_am, stride_ak, stride_bk, stride_bn,
                IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A[offs_m, :K] @ B[:K, offs_n], K streamed in BLOCK_K tiles."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = dot(a, b, acc, IEEE)
    return acc


@triton.jit(do_not_specialize=["seed_mix", "threshold", "inv_keep"])
def _extended_k_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, c_ptr, bias_ptr, M, N, K1, K2,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cm, stride_cn,
    seed_mix, threshold, inv_keep,
    HAS_BIAS: tl.constexpr, DROP_OUT: tl.constexpr, IEEE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A1 @ B1 + A2 @ B2 (+ bias): one output tile, K = K1 then K2 (the LoRA rank;
    DROP_OUT: masked by dropout, see `_low_rank_and_store`)."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = _accumulate(acc, a1_ptr, b1_ptr, offs_m, offs_n, M, N, K1,
                      stride_a1m, stride_a1k, stride_b1k, stride_b1n, IEEE, BLOCK_K)
    _low_rank_and_store(acc, a2_ptr, b2_ptr, c_ptr, bias_ptr, offs_m, offs_n, M, N, K2,
                        stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cm, stride_cn,
                        seed_mix, threshold, inv_keep,
                        HAS_BIAS, DROP_OUT, IEEE, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program's output tile in grouped order: GROUP_M row-tiles in
    a row share the same weight columns in L2."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _low_rank_and_store(
    acc, a2_ptr, b2_ptr, c_ptr, bias_ptr, offs_m, offs_n, M, N, K2,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cm, stride_cn,
    seed_mix, threshold, inv_keep,
    HAS_BIAS: tl.constexpr, DROP_OUT: tl.constexpr, IEEE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """C tile = acc + A2 @ B2 (+ bias), stored: the LoRA half (K = the rank) of an
    extended-K GEMM whose base half is in acc (dense W here, NF4 in lora_linear_nf4).

    DROP_OUT (backward dx): the A2 @ B2 half is multiplied by the keep-mask of C's element
    (C is [N, d_in] like x) and by 1/(1-p), so it needs its own accumulator.
    """
    if DROP_OUT:
        low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        low_rank = _accumulate(low_rank, a2_ptr, b2_ptr, offs_m, offs_n, M, N, K2,
                               stride_a2m, stride_a2k, stride_b2k, stride_b2n, IEEE, BLOCK_R)
        keep = _keep(offs_m[:, None] * N + offs_n[None, :], seed_mix, threshold)
        acc += tl.where(keep, low_rank * inv_keep, 0.0)
    else:
        acc = _accumulate(acc, a2_ptr, b2_ptr, offs_m, offs_n, M, N, K2,
                          stride_a2m, stride_a2k, stride_b2k, stride_b2n, IEEE, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------- host side


def _dropout_args(dropout: float, seed: int):
    """(seed_mix, threshold, 1/(1-p)) as the kernels take them."""
    seed_mix = ((int(seed) & 0xFFFFFFFF) * _HASH_SEED_MUL + _HASH_OFFSET) & 0xFFFFFFFF
    return seed_mix, int(dropout * (1 << 24)), 1.0 / (1.0 - dropout)


def _ieee(dtype):
    # fp32 inputs get full fp32 products (torch's matmul default), not TF32
    return dtype in (torch.float32, torch.float64)


def _acc_dtype(dtype):
    # fp32 accumulation; float64 inputs (tests) keep float64
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _tiles(dtype, is_cuda: bool, drop_out: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the extended-K kernel.

    GPU: 128 x 128 output tiles, 8 warps, 3 stages; fp32 halves BLOCK_K so the staged
    operand tiles take the same 96 KiB of shared memory as bf16 at BLOCK_K 64. DROP_OUT
    (the backward's dx with dropout) carries a second fp32 accumulator: half the columns,
    and for fp32 (IEEE products are FMA loops, not tensor-core MMAs) half the rows too.
    `pdengine bench kernels` shows these compile for sm_90 with no spill (128 x 64 fp32
    spilled 160-290 B per thread)."""
    if not is_cuda:  # interpreter: few, small programs
        return 32, 32, 32, 4, 1
    if dtype == torch.float64:
        return 64, 64, 16, 4, 2
    block_m, block_n, block_k = (128, 128, 32) if dtype == torch.float32 else (128, 128, 64)
    if drop_out:
        block_n //= 2
        if dtype == torch.float32:
            block_m //= 2
    return block_m, block_n, block_k, 8, 3


_MM_WARPS = 8

# enough programs to fill an H100/H200 (132 SMs) about twice
_TARGET_PROGRAMS = 264


def _split_k(tiles: int, K: int, block_k: int, is_cuda: bool) -> int:
    """How many K-slices a few-tile GEMM is cut into (1 on the CPU interpreter)."""
    if not is_cuda or tiles >= _TARGET_PROGRAMS // 2:
        return 1
    # each slice keeps at least 8 BLOCK_K steps so the atomics stay cheap
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), K // (8 * block_k)))


def _mm_blocks(M: int, N: int, dtype, is_cuda: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K) of `_mm_kernel` (8 warps, 3 stages on a GPU: 4 warps
    spilled with a dropout operand): tiles up to 128 x 128, 64-row ones when 128-row tiles
    would leave SMs idle."""
    block_n = _pow2_clamp(N, 16, 128 if is_cuda else 32)
    block_m = _pow2_clamp(M, 16, 32)
    if is_cuda:
        few = triton.cdiv(M, 128) * triton.cdiv(N, block_n) < _TARGET_PROGRAMS // 2
        block_m = _pow2_clamp(M, 16, 64 if few else 128)
    block_k = 64 if is_cuda and dtype in (torch.float16, torch.bfloat16) else 32
    if dtype == torch.float32 and is_cuda:  # IEEE FMA tiles: 64 x 128 x 32 spilled 0.7-5.6 KB
        block_m, block_n, block_k = min(block_m, 64), min(block_n, 64), 16
    if dtype == torch.float64 and is_cuda:
        block_m, block_n, block_k = min(block_m, 64), min(block_n, 64), 16
    return block_m, block_n, block_k


def _mm(a, b, c, alpha, *, drop_a=False, drop_b=False, dropout_args=(0, 0, 1.0), x_cols=0,
        split_k=None):
    """c = alpha * op(a) @ op(b), a [M, K], b [K, N] given as (possibly transposed) views.

    With split_k > 1 (chosen automatically when None), c must be fp32/fp64: it is zeroed
    and accumulated into atomically.
    """
    M, K = a.shape
    N = b.shape[1]
    seed_mix, threshold, _ = dropout_args
    block_m, block_n, block_k = _mm_blocks(M, N, a.dtype, a.is_cuda)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if split_k is None:
        split_k = _split_k(tiles, K, block_k, a.is_cuda) if c.dtype in (torch.float32, torch.float64) else 1
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    if split_k > 1:
        c.zero_()
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _mm_kernel[grid](
        a, b, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        alpha, seed_mix, threshold, x_cols, k_per_split,
        DROP_A=drop_a, DROP_B=drop_b, IEEE=_ieee(a.dtype), ACC_DTYPE=_acc_dtype(a.dtype),
        SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=_MM_WARPS if a.is_cuda else 4, num_stages=3 if a.is_cuda else 1,
    )
    return c


def _extended_k(a1, b1, a2, b2, c, bias=None, *, drop_out=False, dropout_args=(0, 0, 1.0)):
    """c = a1 @ b1 + a2 @ b2 (+ bias), the second product masked by dropout if drop_out."""
    M, K1 = a1.shape
    N, K2 = b1.shape[1], a2.shape[1]
    block_m, block_n, block_k, warps, stages = _tiles(a1.dtype, a1.is_cuda, drop_out)
    block_r = _pow2_clamp(K2, 16, block_k)
    seed_mix, threshold, inv_keep = dropout_args
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _extended_k_kernel[grid](
        a1, b1, a2, b2, c, bias if bias is not None else c, M, N, K1, K2,
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), c.stride(0), c.stride(1),
        seed_mix, threshold, inv_keep,
        HAS_BIAS=bias is not None, DROP_OUT=drop_out, IEEE=_ieee(a1.dtype),
        ACC_DTYPE=_acc_dtype(a1.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return c


def _lora_input(x, lora_a, alpha, dropout, seed):
    """alpha * dropout(x) A^T as [N, r] in x's dtype (dropout's 1/(1-p) folded into alpha)."""
    args = _dropout_args(dropout, seed)
    xa = torch.empty((x.shape[0], lora_a.shape[0]), device=x.device, dtype=x.dtype)
    scale = alpha * (args[2] if dropout > 0 else 1.0)
    return _mm(x, lora_a.to(x.dtype).T, xa, scale, drop_a=dropout > 0, dropout_args=args, x_cols=x.shape[1])


def lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout, seed):
    """y [N, d_out] = x W^T (+ bias) + scale * (dropout(x) A^T) B^T, in x's dtype.
    Arguments are checked by the op's one boundary (pdengine/ops/_checks.py)."""
    weight = weight.to(x.dtype)  # the tensor-core operands share x's dtype
    xa_s = _lora_input(x, lora_a, scale, dropout, seed)
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    return _extended_k(x, weight.T, xa_s, lora_b.to(x.dtype).T, y, bias)


def lora_linear_backward(grad_out, x, weight, lora_a, lora_b, scale, dropout, seed):
    """(grad_x, grad_lora_a, grad_lora_b) of lora_linear; W and bias are frozen."""
    weight = weight.to(x.dtype)
    return _lora_backward(grad_out, x, lora_a, lora_b, scale, dropout, seed,
                         lambda dy, *rest, **kw: _extended_k(dy, weight, *rest, **kw))


def _lora_backward(grad_out, x, lora_a, lora_b, scale, dropout, seed, base_dx):
    """(grad_x, grad_lora_a, grad_lora_b) of a LoRA linear on a frozen base, given the
    base's extended-K dx GEMM `base_dx(dy, dyB_s, A, out, drop_out=, dropout_args=)`:
    out = [dy, dyB_s] @ [W; A], W dense here or NF4 (kernels.lora_linear_nf4)."""
    dy = grad_out.to(x.dtype)
    args = _dropout_args(dropout, seed)
    n, r = x.shape[0], lora_a.shape[0]
    a_c, b_c = lora_a.to(x.dtype), lora_b.to(x.dtype)
    dyb_s = _mm(dy, b_c, torch.empty((n, r), device=x.device, dtype=x.dtype), scale)
    grad_x = base_dx(dy, dyb_s, a_c, torch.empty_like(x), drop_out=dropout > 0, dropout_args=args)
    grad_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_a = torch.empty(lora_a.shape, device=x.device, dtype=grad_dtype)
    _mm(dyb_s.T, x, grad_a, args[2] if dropout > 0 else 1.0,
        drop_b=dropout > 0, dropout_args=args, x_cols=x.shape[1])
    xa = _lora_input(x, lora_a, 1.0, dropout, seed)
    grad_b = torch.empty(lora_b.shape, device=x.device, dtype=grad_dtype)
    _mm(dy.T, xa, grad_b, scale)
    return grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)
