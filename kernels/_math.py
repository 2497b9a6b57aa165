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
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h = tl.load(h_ptr + rows64[:, None] * stride_h + ds[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_w + ds[None, :],
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = dot(h, tl.trans(w), acc, IEEE)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            ha = tl.load(ha_ptr + rows64[:, None] * stride_ha + rs[None, :],
                         mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            b = tl.load(b_ptr + cols64[:, None] * stride_b + rs[None, :],
                        mask=col_mask[:, None] & r_mask[None, :], other=0.0)
            acc = dot(ha, tl.trans(b), acc, IEEE)
    return acc
