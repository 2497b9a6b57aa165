"""Device functions shared by several kernels.

Precision: every kernel takes one constexpr flag, `IEEE`, set by its launcher for fp32
(and fp64) inputs: their products are then full fp32 (torch's matmul default) instead of
TF32, which would reorder near-tied top-k ids and cost the fp32 tests their 2e-5
tolerance. fp16/bf16 inputs use the tensor cores' native products either way.
"""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh from exp of a non-positive argument: never overflows for any |x|, and works in
    # the interpreter (abs. error ~1e-7 in fp32).
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, full fp32 products when IEEE (see the module docstring)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def dot_nt(acc, a_ptr, a_idx, a_mask, stride_a, b_ptr, b_idx, b_mask, stride_b, K,
           IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[a_idx, :K] @ B[b_idx, :K]^T, K in BLOCK_K chunks: rows gathered from two
    row-major matrices with unit stride along K (int64 row indices; masked rows read 0)."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + a_idx[:, None] * stride_a + ks[None, :],
                    mask=a_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_idx[:, None] * stride_b + ks[None, :],
                    mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        acc = dot(a, tl.trans(b), acc, IEEE)
    return acc


@triton.jit
def logit_tile(
    h_ptr, w_ptr, ha_ptr, b_ptr,
    rows, cols, row_mask, col_mask,
    D, R, stride_h, stride_w, stride_ha, stride_b,
    HAS_LORA: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Raw lm_head logits u[rows, cols] = h W^T (+ hA B^T) for one tile, fp32.

    Row-major inputs with unit stride along d (and r): h [N, d], W [V, d], hA [N, r],
    B [V, r]. The LoRA term (hA = s h A^T, precomputed) rides the same dots, in rank
    chunks of BLOCK_R (r can be 1024: the paper's lm_head LoRA).
    """
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc = dot_nt(acc, h_ptr, rows64, row_mask, stride_h, w_ptr, cols64, col_mask, stride_w, D,
                 IEEE, BLOCK_D)
    if HAS_LORA:
        acc = dot_nt(acc, ha_ptr, rows64, row_mask, stride_ha, b_ptr, cols64, col_mask, stride_b, R,
                     IEEE, BLOCK_R)
    return acc
