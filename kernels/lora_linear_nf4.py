"""Triton kernels of the fused LoRA linear on an NF4 base (docs/DESIGN.md, "Quantized base").

Same algorithm as `kernels/lora_linear.py` ("LoRA matmul"), with the base operand given
as bitsandbytes' NF4 layout instead of a dense W [d_out, d_in]:
  packed  uint8, two 4-bit codes per byte, high nibble first, over W's row-major flat index;
  absmax  one scale per `blocksize` consecutive flat elements (fp32), or, double-quantized,
          uint8 codes with absmax[b] = nested_code[q[b]] * nested_absmax[b // nested_blocksize]
          + nested_offset;
  code    the 16-entry NF4 table.
Each K step of the extended-K GEMM loads the tile's bytes, picks the nibble, looks up the
table and scales by the block's absmax in registers, in fp32 as bitsandbytes does (and
without fusing its multiply-add into an FMA, so the values are bitwise bitsandbytes'), then
rounds to the weight's dtype and x's dtype for tl.dot. No dense weight ever exists.
  forward  y  = [x, xa_s] @ [Wq, B]^T (+ bias)         (Wq^T read with strides (1, d_in))
  backward dx = [dy, dyB_s] @ [Wq; A]                  (Wq read with strides (d_in, 1))
dA and dB do not touch the base: they are `kernels.lora_linear`'s small GEMMs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdengine.kernels._math import dot
from pdengine.kernels.lora_linear import (
    _acc_dtype, _grouped_tile, _ieee, _lora_backward, _lora_input, _low_rank_and_store, _pow2_clamp,
)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _tiles(dtype, is_cuda: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The weight tile is decoded in
    registers (a BLOCK_K x BLOCK_N index, byte, code and scale per element) on top of the
    accumulator, so BLOCK_K is half the dense kernel's: bf16 128x128x32 and fp32 64x64x16
    compile for sm_90 with no spill (tests/test_kernel_resources.py), 128x128x64 spills. fp32
    runs one stage: with two, its dropout variant spilled 12 B (8 warps) and the plain one
    112 B (4 warps); one stage needs 78 registers and fits 3 programs per SM."""
    if not is_cuda:  # interpreter: few, small programs
        return 32, 32, 32, 4, 1
    if dtype == torch.float64:
        return 64, 64, 16, 4, 2
    if dtype == torch.float32:
        return 64, 64, 16, 8, 1
    return 128, 128, 32, 8, 3


@triton.jit
def _nf4_values(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, flat, mask,
                blocksize, nested_blocksize, nested_offset, NESTED: tl.constexpr):
    """fp32 values of the weight elements at flat indices `flat` (0 where ~mask)."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0)
        scale = scale + nested_offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit(do_not_specialize=["seed_mix", "threshold", "inv_keep", "nested_offset"])
def _nf4_extended_k_kernel(
    a1_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
    a2_ptr, b2_ptr, c_ptr, bias_ptr, M, N, K1, K2,
    stride_a1m, stride_a1k, stride_wk, stride_wn,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cm, stride_cn,
    blocksize, nested_blocksize, nested_offset, seed_mix, threshold, inv_keep,
    NESTED: tl.constexpr, W_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, DROP_OUT: tl.constexpr,
    IEEE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A1 @ Wq + A2 @ B2 (+ bias), Wq[k, n] the NF4 element at flat k*stride_wk + n*stride_wn.
    The LoRA half (DROP_OUT: masked by dropout) is `kernels.lora_linear._low_rank_and_store`,
    as in the dense `_extended_k_kernel`."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)

    # weight indices in int32 (the host checks d_out * d_in < 2**31): half the registers
    # of int64 for the BLOCK_K x BLOCK_N tile decoded at every step
    offs_n32 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K1, BLOCK_K):
        offs_k32 = k0 + tl.arange(0, BLOCK_K)
        offs_k = offs_k32.to(tl.int64)
        a = tl.load(a1_ptr + offs_m[:, None] * stride_a1m + offs_k[None, :] * stride_a1k,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K1), other=0.0)
        w_mask = (offs_k32[:, None] < K1) & (offs_n32[None, :] < N)
        flat = offs_k32[:, None] * stride_wk + offs_n32[None, :] * stride_wn
        w = _nf4_values(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, flat, w_mask,
                        blocksize, nested_blocksize, nested_offset, NESTED)
        acc = dot(a, w.to(W_DTYPE).to(a1_ptr.dtype.element_ty), acc, IEEE)
    _low_rank_and_store(acc, a2_ptr, b2_ptr, c_ptr, bias_ptr, offs_m, offs_n, M, N, K2,
                        stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cm, stride_cn,
                        seed_mix, threshold, inv_keep,
                        HAS_BIAS, DROP_OUT, IEEE, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_R)


# ----------------------------------------------------------------------------- host side


def _nf4_gemm(a1, weight, transposed, a2, b2, c, bias=None, *, drop_out=False, dropout_args=(0, 0, 1.0)):
    """c = a1 @ op(Wq) + a2 @ b2 (+ bias); op(Wq) = Wq^T [d_in, d_out] when `transposed`
    (forward), else Wq [d_out, d_in] (backward dx). `weight` is the ops' 10 weight args."""
    packed, absmax, code, nested_absmax, nested_code, blocksize, nested_blocksize, offset, d_out, w_dtype = weight
    if packed.numel() * 2 >= 2**31:
        raise ValueError(f"an NF4 weight of {packed.numel() * 2} elements is beyond the kernel's int32 indices")
    M, K1 = a1.shape
    d_in = a1.shape[1] if transposed else c.shape[1]
    N, K2 = c.shape[1], a2.shape[1]
    stride_wk, stride_wn = (1, d_in) if transposed else (d_in, 1)
    block_m, block_n, block_k, warps, stages = _tiles(a1.dtype, a1.is_cuda)
    if drop_out and a1.is_cuda:  # a second fp32 accumulator: halve the tile to avoid spills
        block_n //= 2
    block_r = _pow2_clamp(K2, 16, block_k)
    seed_mix, threshold, inv_keep = dropout_args
    nested = nested_absmax is not None
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _nf4_extended_k_kernel[grid](
        a1, packed, absmax, code, nested_absmax if nested else absmax, nested_code if nested else code,
        a2, b2, c, bias if bias is not None else c, M, N, K1, K2,
        a1.stride(0), a1.stride(1), stride_wk, stride_wn,
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), c.stride(0), c.stride(1),
        blocksize, max(nested_blocksize, 1), offset, seed_mix, threshold, inv_keep,
        NESTED=nested, W_DTYPE=_TL_DTYPES[w_dtype], HAS_BIAS=bias is not None, DROP_OUT=drop_out,
        IEEE=_ieee(a1.dtype), ACC_DTYPE=_acc_dtype(a1.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=8,
        num_warps=warps, num_stages=stages,
        # bitsandbytes rounds code * scale (+ offset) step by step: no FMA, same bits
        enable_fp_fusion=False,
    )
    return c


def lora_linear_nf4(x, *args):
    """y [N, d_out] = x Wq^T (+ bias) + scale * (dropout(x) A^T) B^T, in x's dtype.
    Positional arguments as the op `pdengine::lora_linear_nf4`."""
    weight, (lora_a, lora_b, scale, bias, dropout, seed) = args[:10], args[10:]
    xa_s = _lora_input(x, lora_a, scale, dropout, seed)
    y = torch.empty((x.shape[0], weight[8]), device=x.device, dtype=x.dtype)
    return _nf4_gemm(x, weight, True, xa_s, lora_b.to(x.dtype).T, y, bias)


def lora_linear_nf4_backward(grad_out, x, *args):
    """(grad_x, grad_lora_a, grad_lora_b) of lora_linear_nf4; the base is frozen."""
    weight, (lora_a, lora_b, scale, dropout, seed) = args[:10], args[10:]
    return _lora_backward(grad_out, x, lora_a, lora_b, scale, dropout, seed,
                         lambda dy, *rest, **kw: _nf4_gemm(dy, weight, False, *rest, **kw))
