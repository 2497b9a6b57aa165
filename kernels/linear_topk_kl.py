"""Fused lm_head + top-k KL loss in Triton: the [N, V] logits never exist.

Math: docs/DESIGN.md, "Fused loss". Six kernels, all accumulating in fp32:

forward
  _lse_kernel        grid (token blocks, vocabulary splits): logit tiles h W^T +
                     (s h A^T) B^T, soft-cap, temperature, online max/sum over the
                     split's vocabulary tiles -> partial (max, sum) [splits, N], merged
                     into lse [N] by the launcher (splits keep every SM busy when N is
                     small; one split when N alone fills the GPU).
  _sparse_fwd_kernel grid (tokens): the logits at the k teacher ids (and the label) as
                     k dot products of h with W rows (O(k d) per token, d chunked), then
                     the per-token KL (+ CE) from them and lse -> loss [N].
backward (G = dL/du = dense part c_n q_v scaled per row + sparse part at the ids/label)
  _sparse_bwd_kernel grid (tokens): recomputes the logits at the ids, writes the dense
                     row coefficient, initialises dh and (G B) with the sparse part and
                     scatters the sparse part into dW and dB (fp32 atomics).
  _dense_bwd_kernel  grid (token blocks, vocabulary blocks): recomputes one logit tile,
                     G tile = coef_n * q * softcap'(u), then adds G W into dh, G^T h into
                     dW, G B into (G B) and G^T (s h A^T) into dB with fp32 atomics.
                     Each output element receives V/BLOCK_V (dh) or N/BLOCK_N (dW) adds;
                     the alternative (one kernel per output, each recomputing the
                     logits) costs 2 N d V more FLOPs.
single pass (grad_loss known up front: a reduced loss; linear_topk_kl_forward_backward)
  _sweep_kernel      grid (token blocks): one sweep over the vocabulary with the online
                     (max, sum) and the dense hidden gradient accumulated flash-attention
                     style (rescaled when the max grows); keeps its tiles for a token chunk
                     when dW or dB is wanted. Then _sparse_bwd_kernel (SINGLE_PASS: also the
                     loss, and the per-row scale coef / s of the accumulated dense part).
  _kept_wgrad_kernel grid (token blocks, vocabulary tiles): dW and dB from the kept tiles.
                     4 N d V GEMM FLOPs with a frozen lm_head, 6 with a trainable one
                     (the two-pass path: 6 and 8).

LoRA: the launchers compute hA = s * h A^T [N, r] (fp32 GEMM, stored in the input dtype
like any activation) and, in the backward, finish
dh += s (G B) A and dA = s (G B)^T h with small torch matmuls (O(N r d), no [N, V]).

The launchers take the schema's positional arguments (pdengine/ops/_library.py) and check
nothing: the raw op's one boundary does (pdengine/ops/_checks.py, as csrc/ does for C++).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pdengine.kernels._math import dot, logit_tile
from pdengine.kernels._math import tanh as _tanh

# Same constant as pdengine.reference.TAIL_MASS_EPS (not imported: kernels stay free of
# the library; a test checks the two agree).
TAIL_MASS_EPS = 1e-6
_TAIL_EPS = tl.constexpr(TAIL_MASS_EPS)  # jit code may only read constexpr globals

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# One fixed config per kernel and input width. Interpreter: larger vocabulary tiles and
# fewer programs, since each interpreted op costs the same whatever its size.
#
# GPU (sm_90): chosen from `pdengine bench kernels` (bench/kernels.py), the largest tiles
# that compile with no register spill with every flag on (LoRA + soft-cap): the address
# tensors of the gathered tiles cost as many registers as the fp32 accumulators, so
# 128 x 128 tiles (the first choice, by tensor-core tile size) spilled 300 B - 1.8 KB per
# thread in every tiled kernel. 16-bit inputs keep 128-wide vocabulary tiles where they
# fit (lse, sweep, the dW-less backward) and 64 x 64 with dW (two accumulating GEMMs);
# BLOCK_D 32 where the tile also carries an accumulator chunk. fp32 inputs take IEEE
# products, which are FMA loops rather than tensor-core MMAs and need far more registers
# per tile: quarter-size tiles. Two stages everywhere (three spilled). The dense
# backward's atomic traffic is N d V (1/BLOCK_V for dh + 1/BLOCK_N for dW).
# Not yet timed on a GPU: bench/gpu_suite.py measures them.
if _INTERPRET:
    _CONFIGS = {
        "fwd": dict(BLOCK_N=32, BLOCK_V=256, BLOCK_D=64, num_warps=4, num_stages=1),
        "bwd": dict(BLOCK_N=32, BLOCK_V=256, BLOCK_D=64, num_warps=4, num_stages=1),
    }
    _CONFIGS.update(sweep=_CONFIGS["fwd"], sweep_keep=_CONFIGS["fwd"], bwd_no_wgrad=_CONFIGS["bwd"])
    _CONFIGS_FP32 = _CONFIGS
    _SPARSE = dict(BLOCK_D=128, num_warps=4)
else:
    _CONFIGS = {
        "fwd": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2),
        "sweep": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=2),
        # keeping the tiles too (trainable head / LoRA) spilled 264 B at 128-wide tiles and
        # 32 B at BLOCK_D 32
        "sweep_keep": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
        "bwd": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2),
        "bwd_no_wgrad": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=2),
    }
    _CONFIGS_FP32 = {
        "fwd": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2),
        "sweep": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
        "sweep_keep": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
        "bwd": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
        "bwd_no_wgrad": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
    }
    # per-token kernels: [BLOCK_K, BLOCK_D] gathered rows of W (twice: ids and label);
    # BLOCK_D 128 spilled 2-4 KB per thread, 32 none
    _SPARSE = dict(BLOCK_D=32, num_warps=4)
# LoRA rank chunk of the tiled kernels (64 spilled on sm_90)
_MAX_BLOCK_R = 64 if _INTERPRET else 32


def config(kind: str, dtype) -> dict:
    """Block config of a tiled kernel ("fwd", "sweep", "sweep_keep", "bwd", "bwd_no_wgrad") for inputs
    of `dtype` (the compute dtype: float64 inputs run as float32)."""
    return (_CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS)[kind]


# --------------------------------------------------------------------------- helpers


@triton.jit
def _sparse_logits(
    h_ptr, w_ptr, ha_ptr, b_ptr, row, ids, id_mask,
    D, R, stride_h, stride_w, stride_ha, stride_b,
    HAS_LORA: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """u[row, ids] as BLOCK_K dot products with gathered W rows, d chunked; fp32."""
    ids64 = ids.to(tl.int64)
    row64 = row.to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h = tl.load(h_ptr + row64 * stride_h + ds, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ids64[:, None] * stride_w + ds[None, :],
                    mask=id_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], axis=1)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            ha = tl.load(ha_ptr + row64 * stride_ha + rs, mask=r_mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + ids64[:, None] * stride_b + rs[None, :],
                        mask=id_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(b * ha[None, :], axis=1)
    return acc


@triton.jit
def _capped_scaled(u, softcap, inv_tau, SOFTCAP: tl.constexpr):
    """z = softcap(u) / tau."""
    if SOFTCAP:
        u = softcap * _tanh(u / softcap)
    return u * inv_tau


# --------------------------------------------------------------------------- forward


@triton.jit
def _lse_kernel(
    h_ptr, w_ptr, ha_ptr, b_ptr, max_ptr, sum_ptr,
    N, V, D, R, stride_h, stride_w, stride_ha, stride_b,
    inv_tau, softcap, tiles_per_split,
    HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_mask = rows < N
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        u = logit_tile(h_ptr, w_ptr, ha_ptr, b_ptr, rows, cols, row_mask, col_mask,
                       D, R, stride_h, stride_w, stride_ha, stride_b,
                       HAS_LORA, IEEE, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
        z = _capped_scaled(u, softcap, inv_tau, SOFTCAP)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(max_ptr + split * N + rows, m, mask=row_mask)
    tl.store(sum_ptr + split * N + rows, s, mask=row_mask)


@triton.jit
def _teacher_terms(lp_ptr, row, ks, k_mask, stride_lp, logq, TAIL: tl.constexpr):
    """Per-token KL and the dense coefficient / id corrections of dKL/dz (docs/DESIGN.md, "Fused loss").

    Returns (kl, c, corr[BLOCK_K]) with dKL/dz_v = c q_v + sum_j corr_j [v == id_j].
    """
    lp = tl.load(lp_ptr + row.to(tl.int64) * stride_lp + ks, mask=k_mask, other=0.0).to(tl.float32)
    q = tl.where(k_mask, tl.exp(logq), 0.0)
    if TAIL:
        p = tl.where(k_mask, tl.exp(lp), 0.0)
        p_sum = tl.sum(p, axis=0)
        r = tl.maximum(1.0 - p_sum, 0.0)
        q_sum = tl.sum(q, axis=0)
        s_raw = 1.0 - q_sum
        clamped = s_raw < _TAIL_EPS
        s = tl.maximum(s_raw, _TAIL_EPS)
        r_log_r = tl.where(r > 0, r * tl.log(tl.where(r > 0, r, 1.0)), 0.0)
        kl = tl.sum(tl.where(k_mask, p * (lp - logq), 0.0), axis=0) + r_log_r - r * tl.log(s)
        ratio = tl.where(clamped, 0.0, r / s)  # the clamp stops the tail term's gradient
        c = p_sum - ratio * q_sum
        corr = ratio * q - p
    else:
        lp_m = tl.where(k_mask, lp, -1e30)  # finite: keeps 0 * (masked lane) at 0
        lp_max = tl.max(lp_m, axis=0)
        e = tl.where(k_mask, tl.exp(lp_m - lp_max), 0.0)
        log_p_hat = lp_m - lp_max - tl.log(tl.sum(e, axis=0))
        p_hat = tl.where(k_mask, tl.exp(log_p_hat), 0.0)
        kl = tl.sum(tl.where(k_mask, p_hat * (log_p_hat - logq), 0.0), axis=0)
        c = tl.sum(p_hat, axis=0)
        corr = -p_hat
    return kl, c, corr


@triton.jit
def _sparse_fwd_kernel(
    h_ptr, w_ptr, ha_ptr, b_ptr, ids_ptr, lp_ptr, labels_ptr, lse_ptr, loss_ptr,
    D, R, K, stride_h, stride_w, stride_ha, stride_b, stride_ids, stride_lp,
    inv_tau, softcap, ce_weight, ignore_index,
    HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, TAIL: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    ids = tl.load(ids_ptr + row.to(tl.int64) * stride_ids + ks, mask=k_mask, other=0)
    u = _sparse_logits(h_ptr, w_ptr, ha_ptr, b_ptr, row, ids, k_mask,
                       D, R, stride_h, stride_w, stride_ha, stride_b,
                       HAS_LORA, BLOCK_K, BLOCK_D, BLOCK_R)
    lse = tl.load(lse_ptr + row)
    logq = _capped_scaled(u, softcap, inv_tau, SOFTCAP) - lse
    loss, c, corr = _teacher_terms(lp_ptr, row, ks, k_mask, stride_lp, logq, TAIL)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        counted = label != ignore_index
        if HAS_CE:
            lab_ids = tl.where(ks == 0, tl.where(counted, label, 0), 0)
            u_y = _sparse_logits(h_ptr, w_ptr, ha_ptr, b_ptr, row, lab_ids, ks == 0,
                                 D, R, stride_h, stride_w, stride_ha, stride_b,
                                 HAS_LORA, BLOCK_K, BLOCK_D, BLOCK_R)
            z_y = tl.sum(tl.where(ks == 0, _capped_scaled(u_y, softcap, inv_tau, SOFTCAP), 0.0), axis=0)
            loss += ce_weight * (lse - z_y)
        loss = tl.where(counted, loss, 0.0)
    tl.store(loss_ptr + row, loss)


# --------------------------------------------------------------------------- backward


@triton.jit
def _softcap_grad(u, softcap, SOFTCAP: tl.constexpr):
    """d softcap(u) / du = 1 - tanh^2(u / c) (1 without soft-cap)."""
    if SOFTCAP:
        t = _tanh(u / softcap)
        return 1.0 - t * t
    return tl.full(u.shape, 1.0, dtype=tl.float32)


@triton.jit
def _sparse_bwd_kernel(
    grad_ptr, h_ptr, w_ptr, ha_ptr, b_ptr, ids_ptr, lp_ptr, labels_ptr, lse_ptr,
    coef_ptr, dh_ptr, gb_ptr, dw_ptr, db_ptr, loss_ptr, sum_ptr,
    D, R, K, stride_h, stride_w, stride_ha, stride_b, stride_ids, stride_lp,
    inv_tau, softcap, ce_weight, ignore_index,
    HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, TAIL: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The sparse part of G for one token (see the module docstring). SINGLE_PASS: also the
    token's loss, and dh / (G B) rows already hold the sweep's unnormalised dense sums
    (sum_v exp(z_v - m) softcap'(u_v) W_v), which become coef / s times themselves."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    ids = tl.load(ids_ptr + row64 * stride_ids + ks, mask=k_mask, other=0)
    u = _sparse_logits(h_ptr, w_ptr, ha_ptr, b_ptr, row, ids, k_mask,
                       D, R, stride_h, stride_w, stride_ha, stride_b,
                       HAS_LORA, BLOCK_K, BLOCK_D, BLOCK_R)
    lse = tl.load(lse_ptr + row)
    logq = _capped_scaled(u, softcap, inv_tau, SOFTCAP) - lse
    loss, c, corr = _teacher_terms(lp_ptr, row, ks, k_mask, stride_lp, logq, TAIL)
    g = tl.load(grad_ptr + row).to(tl.float32) * inv_tau  # dL/du = dL/dz / tau
    # The CE label is one more sparse entry: slot 0 of a second BLOCK_K-wide vector
    # (masked elsewhere), so every tile stays a power of two.
    y_val = tl.zeros((BLOCK_K,), dtype=tl.float32)
    y_ids = tl.zeros((BLOCK_K,), dtype=ids.dtype)
    y_mask = ks < 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        counted = label != ignore_index
        g = tl.where(counted, g, 0.0)
        if HAS_CE:
            c += ce_weight
            # slot 0 holds the label, only for counted tokens (an int test keeps the
            # mask a plain tensor compare, which the interpreter needs)
            y_mask = (ks + tl.where(counted, 0, 1)) == 0
            y_ids = tl.where(y_mask, label, 0).to(ids.dtype)
            u_y = _sparse_logits(h_ptr, w_ptr, ha_ptr, b_ptr, row, y_ids, y_mask,
                                 D, R, stride_h, stride_w, stride_ha, stride_b,
                                 HAS_LORA, BLOCK_K, BLOCK_D, BLOCK_R)
            y_val = tl.where(y_mask, -ce_weight * g * _softcap_grad(u_y, softcap, SOFTCAP), 0.0)
            z_y = tl.sum(tl.where(y_mask, _capped_scaled(u_y, softcap, inv_tau, SOFTCAP), 0.0), axis=0)
            loss += ce_weight * (lse - z_y)
        loss = tl.where(counted, loss, 0.0)
    if SINGLE_PASS:
        tl.store(loss_ptr + row, loss)
        dense_scale = g * c / tl.load(sum_ptr + row)
    else:
        dense_scale = 0.0
    tl.store(coef_ptr + row, g * c)
    k_val = tl.where(k_mask, g * corr * _softcap_grad(u, softcap, SOFTCAP), 0.0)
    _scatter_sparse(h_ptr, w_ptr, ha_ptr, b_ptr, dh_ptr, gb_ptr, dw_ptr, db_ptr, row64,
                    ids.to(tl.int64), k_val, k_mask, y_ids.to(tl.int64), y_val, y_mask, dense_scale,
                    D, R, stride_h, stride_w, stride_ha, stride_b,
                    HAS_LORA, WEIGHT_GRAD, SINGLE_PASS, BLOCK_K, BLOCK_D, BLOCK_R)


@triton.jit
def _scatter_sparse(
    h_ptr, w_ptr, ha_ptr, b_ptr, dh_ptr, gb_ptr, dw_ptr, db_ptr, row64,
    ids, k_val, k_mask, y_ids, y_val, y_mask, dense_scale,
    D, R, stride_h, stride_w, stride_ha, stride_b,
    HAS_LORA: tl.constexpr, WEIGHT_GRAD: tl.constexpr, DENSE_IN: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Sparse part of G (values at the ids and the label) into dh, (G B), dW, dB.

    dh [N, d] and (G B) [N, r] rows belong to this program (plain stores; DENSE_IN: they
    hold the dense part already, scaled here by dense_scale; otherwise the dense kernel adds
    it later); dW and dB rows are shared between tokens (atomics).
    """
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        wk = tl.load(w_ptr + ids[:, None] * stride_w + ds[None, :],
                     mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        wy = tl.load(w_ptr + y_ids[:, None] * stride_w + ds[None, :],
                     mask=y_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        dh = tl.sum(k_val[:, None] * wk, axis=0) + tl.sum(y_val[:, None] * wy, axis=0)
        if DENSE_IN:
            dh += dense_scale * tl.load(dh_ptr + row64 * D + ds, mask=d_mask, other=0.0)
        tl.store(dh_ptr + row64 * D + ds, dh, mask=d_mask)
        if WEIGHT_GRAD:
            h = tl.load(h_ptr + row64 * stride_h + ds, mask=d_mask, other=0.0).to(tl.float32)
            tl.atomic_add(dw_ptr + ids[:, None] * D + ds[None, :], k_val[:, None] * h[None, :],
                          mask=k_mask[:, None] & d_mask[None, :])
            tl.atomic_add(dw_ptr + y_ids[:, None] * D + ds[None, :], y_val[:, None] * h[None, :],
                          mask=y_mask[:, None] & d_mask[None, :])
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            bk = tl.load(b_ptr + ids[:, None] * stride_b + rs[None, :],
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            by = tl.load(b_ptr + y_ids[:, None] * stride_b + rs[None, :],
                         mask=y_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            gb = tl.sum(k_val[:, None] * bk, axis=0) + tl.sum(y_val[:, None] * by, axis=0)
            if DENSE_IN:
                gb += dense_scale * tl.load(gb_ptr + row64 * R + rs, mask=r_mask, other=0.0)
            tl.store(gb_ptr + row64 * R + rs, gb, mask=r_mask)
            ha = tl.load(ha_ptr + row64 * stride_ha + rs, mask=r_mask, other=0.0).to(tl.float32)
            tl.atomic_add(db_ptr + ids[:, None] * R + rs[None, :], k_val[:, None] * ha[None, :],
                          mask=k_mask[:, None] & r_mask[None, :])
            tl.atomic_add(db_ptr + y_ids[:, None] * R + rs[None, :], y_val[:, None] * ha[None, :],
                          mask=y_mask[:, None] & r_mask[None, :])


@triton.jit
def _weight_grads(g_t, h_ptr, ha_ptr, dw_ptr, db_ptr, rows64, cols64, row_mask, col_mask, D, R,
                  stride_h, stride_ha, HAS_LORA: tl.constexpr, WEIGHT_GRAD: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """dW += G^T h and dB += G^T hA for one tile of G, given transposed (`g_t`, [BLOCK_V,
    BLOCK_N], in the tensor-core input dtype): fp32 atomics. Shared by the two-pass
    backward and the single pass's kept-tile kernel."""
    if WEIGHT_GRAD:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            h = tl.load(h_ptr + rows64[:, None] * stride_h + ds[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            dw = dot(g_t, h, tl.zeros((BLOCK_V, BLOCK_D), tl.float32), IEEE)
            tl.atomic_add(dw_ptr + cols64[:, None] * D + ds[None, :], dw,
                          mask=col_mask[:, None] & d_mask[None, :])
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            ha = tl.load(ha_ptr + rows64[:, None] * stride_ha + rs[None, :],
                         mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            db = dot(g_t, ha, tl.zeros((BLOCK_V, BLOCK_R), tl.float32), IEEE)
            tl.atomic_add(db_ptr + cols64[:, None] * R + rs[None, :], db,
                          mask=col_mask[:, None] & r_mask[None, :])


@triton.jit
def _dense_bwd_kernel(
    h_ptr, w_ptr, ha_ptr, b_ptr, lse_ptr, coef_ptr, dh_ptr, gb_ptr, dw_ptr, db_ptr,
    N, V, D, R, stride_h, stride_w, stride_ha, stride_b,
    inv_tau, softcap,
    HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The dense part of G for one (token block, vocabulary block) tile of the two-pass
    backward: the logit tile recomputed, then its products into dh, dW, (G B) and dB."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    u = logit_tile(h_ptr, w_ptr, ha_ptr, b_ptr, rows, cols, row_mask, col_mask,
                   D, R, stride_h, stride_w, stride_ha, stride_b,
                   HAS_LORA, IEEE, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    q = tl.exp(_capped_scaled(u, softcap, inv_tau, SOFTCAP) - lse[:, None])
    g = coef[:, None] * q * _softcap_grad(u, softcap, SOFTCAP)
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
    g_in = g.to(w_ptr.dtype.element_ty)  # tensor-core input dtype; the sums stay fp32
    g_in_t = tl.trans(g_in)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        w = tl.load(w_ptr + cols64[:, None] * stride_w + ds[None, :],
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        dh = dot(g_in, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), IEEE)
        tl.atomic_add(dh_ptr + rows64[:, None] * D + ds[None, :], dh,
                      mask=row_mask[:, None] & d_mask[None, :])
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            b = tl.load(b_ptr + cols64[:, None] * stride_b + rs[None, :],
                        mask=col_mask[:, None] & r_mask[None, :], other=0.0)
            gb = dot(g_in, b, tl.zeros((BLOCK_N, BLOCK_R), tl.float32), IEEE)
            tl.atomic_add(gb_ptr + rows64[:, None] * R + rs[None, :], gb,
                          mask=row_mask[:, None] & r_mask[None, :])
    _weight_grads(g_in_t, h_ptr, ha_ptr, dw_ptr, db_ptr, rows64, cols64, row_mask, col_mask, D, R,
                  stride_h, stride_ha, HAS_LORA, WEIGHT_GRAD, IEEE, BLOCK_V, BLOCK_D, BLOCK_R)


# ------------------------------------------------------------------------ single pass


@triton.jit
def _sweep_kernel(
    h_ptr, w_ptr, ha_ptr, b_ptr, max_ptr, sum_ptr, dh_ptr, gb_ptr, kept_ptr, tile_max_ptr,
    N, V, D, R, stride_h, stride_w, stride_ha, stride_b, n_tiles,
    inv_tau, softcap,
    HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, KEEP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One sweep over the vocabulary for a token block: the online (max m, sum s) of
    exp(z) and, flash-attention style, the unnormalised dense hidden gradient
    acc = sum_v exp(z_v - m) softcap'(u_v) W_v (and the same sum over B rows for LoRA),
    rescaled by exp(m_old - m_new) whenever the running max grows. acc lives in the
    program's own rows of dh [N, d] / (G B) [N, r] (fp32, zero on entry): a [BLOCK_N, d]
    accumulator is far beyond registers for d = 4096. The sparse kernel then turns it into
    coef / s * acc plus the sparse part, once lse = m + log s is final.

    KEEP (a trainable lm_head, or LoRA on it): also store each tile's exp(z - m_tile)
    softcap'(u) in the input dtype into kept [N, V] and m_tile into tile_max [N, n_tiles],
    so that `_kept_wgrad_kernel` makes dW and dB from them without recomputing the logits.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        u = logit_tile(h_ptr, w_ptr, ha_ptr, b_ptr, rows, cols, row_mask, col_mask,
                       D, R, stride_h, stride_w, stride_ha, stride_b,
                       HAS_LORA, IEEE, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
        z = tl.where(col_mask[None, :], _capped_scaled(u, softcap, inv_tau, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf), where acc is 0 anyway
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        gp = (p * _softcap_grad(u, softcap, SOFTCAP)).to(w_ptr.dtype.element_ty)
        if KEEP:
            tl.store(kept_ptr + rows64[:, None] * V + cols64[None, :], gp,
                     mask=row_mask[:, None] & col_mask[None, :])
            tl.store(tile_max_ptr + rows64 * n_tiles + v0 // BLOCK_V, m_new, mask=row_mask)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            w = tl.load(w_ptr + cols64[:, None] * stride_w + ds[None, :],
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            acc_ptrs = dh_ptr + rows64[:, None] * D + ds[None, :]
            acc_mask = row_mask[:, None] & d_mask[None, :]
            acc = tl.load(acc_ptrs, mask=acc_mask, other=0.0) * alpha[:, None]
            tl.store(acc_ptrs, dot(gp, w, acc, IEEE), mask=acc_mask)
        if HAS_LORA:
            for r0 in range(0, R, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                r_mask = rs < R
                b = tl.load(b_ptr + cols64[:, None] * stride_b + rs[None, :],
                            mask=col_mask[:, None] & r_mask[None, :], other=0.0)
                acc_ptrs = gb_ptr + rows64[:, None] * R + rs[None, :]
                acc_mask = row_mask[:, None] & r_mask[None, :]
                acc = tl.load(acc_ptrs, mask=acc_mask, other=0.0) * alpha[:, None]
                tl.store(acc_ptrs, dot(gp, b, acc, IEEE), mask=acc_mask)
    tl.store(max_ptr + rows, m, mask=row_mask)
    tl.store(sum_ptr + rows, s, mask=row_mask)


@triton.jit
def _kept_wgrad_kernel(
    h_ptr, ha_ptr, kept_ptr, tile_max_ptr, row_max_ptr, scale_ptr, dw_ptr, db_ptr,
    N, V, D, R, stride_h, stride_ha, n_tiles,
    HAS_LORA: tl.constexpr, WEIGHT_GRAD: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dW += G^T h and dB += G^T hA for one (token block, vocabulary tile) from the sweep's
    kept tiles: G = kept * coef / s * exp(m_tile - m), no logits recomputed (the single
    pass's 6 N d V with a trainable lm_head). fp32 atomics, as in `_dense_bwd_kernel`."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.program_id(1)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    kept = tl.load(kept_ptr + rows64[:, None] * V + cols64[None, :], mask=mask, other=0.0).to(tl.float32)
    tile_max = tl.load(tile_max_ptr + rows64 * n_tiles + tile, mask=row_mask, other=0.0)
    row_max = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0) * tl.exp(tile_max - row_max)
    g_in_t = tl.trans(tl.where(mask, kept * scale[:, None], 0.0).to(h_ptr.dtype.element_ty))
    _weight_grads(g_in_t, h_ptr, ha_ptr, dw_ptr, db_ptr, rows64, cols64, row_mask, col_mask, D, R,
                  stride_h, stride_ha, HAS_LORA, WEIGHT_GRAD, IEEE, BLOCK_V, BLOCK_D, BLOCK_R)


# --------------------------------------------------------------------------- launchers


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(int(n)))


def _prepare(hidden, weight, lora_a, lora_b, lora_scale):
    """Contiguous kernel inputs (float64 computes in float32) and hA = s h A^T in fp32."""
    compute = torch.float32 if hidden.dtype == torch.float64 else hidden.dtype
    h = hidden.to(compute).contiguous()
    w = weight.to(compute).contiguous()
    if lora_a is None:
        return h, w, None, None
    # hA in the compute dtype: the LoRA term then rides the same tensor-core dots as h W^T
    ha = (lora_scale * (h.float() @ lora_a.float().T)).to(compute).contiguous()
    return h, w, ha, lora_b.to(compute).contiguous()


def _common(h, w, ha, b, teacher_ids, temperature, softcap):
    n, d = h.shape
    k = teacher_ids.shape[1]
    r = 0 if ha is None else ha.shape[1]
    flags = dict(
        HAS_LORA=ha is not None,
        SOFTCAP=softcap > 0,
        BLOCK_R=min(_pow2(r), _MAX_BLOCK_R),
    )
    dummy = h  # never read when the matching flag is off
    strides = (h.stride(0), w.stride(0), 0 if ha is None else ha.stride(0), 0 if b is None else b.stride(0))
    ptrs = (h, w, dummy if ha is None else ha, dummy if b is None else b)
    scalars = dict(inv_tau=1.0 / temperature, softcap=float(softcap) if softcap > 0 else 1.0)
    return n, d, k, r, flags, strides, ptrs, scalars


def _vocab_splits(n_row_blocks: int, n_vocab_tiles: int, device) -> int:
    """Vocabulary splits of the lse kernel: enough programs for two waves over the SMs."""
    if device.type != "cuda":
        return min(2, n_vocab_tiles)  # the interpreter: still exercise the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_vocab_tiles, triton.cdiv(2 * sms, n_row_blocks)))


def _launch_lse(ptrs, strides, scalars, flags, n, v, d, r, ieee):
    cfg = config("fwd", ptrs[0].dtype)
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    tiles = triton.cdiv(v, cfg["BLOCK_V"])
    splits = _vocab_splits(row_blocks, tiles, ptrs[0].device)
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty split
    part_max = torch.empty(splits, n, device=ptrs[0].device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    _lse_kernel[(row_blocks, splits)](
        *ptrs, part_max, part_sum, n, v, d, r, *strides, scalars["inv_tau"], scalars["softcap"],
        tiles_per_split, IEEE=ieee, **flags, **cfg)
    if splits == 1:
        return part_max[0] + part_sum[0].log()
    top = part_max.max(dim=0).values  # finite: every split holds at least one column
    return top + (part_sum * (part_max - top).exp()).sum(dim=0).log()


def linear_topk_kl(hidden, weight, lora_a, lora_b, teacher_ids, teacher_logprobs, labels,
                   lora_scale, temperature, softcap, tail, ce_weight, ignore_index):
    """Per-token loss [N] f32 (KL + ce_weight * CE, 0 where ignored) and lse [N] f32."""
    h, w, ha, b = _prepare(hidden, weight, lora_a, lora_b, lora_scale)
    ids = teacher_ids.contiguous()
    lp = teacher_logprobs.contiguous()
    n, d, k, r, flags, strides, ptrs, scalars = _common(h, w, ha, b, ids, temperature, softcap)
    v = w.shape[0]
    loss = torch.empty(n, device=h.device, dtype=torch.float32)
    if n == 0:
        return loss, torch.empty_like(loss)
    lse = _launch_lse(ptrs, strides, scalars, flags, n, v, d, r, ieee=h.dtype == torch.float32)
    lab = labels.contiguous() if labels is not None else ids
    _sparse_fwd_kernel[(n,)](
        *ptrs, ids, lp, lab, lse, loss, d, r, k, *strides, ids.stride(0), lp.stride(0),
        scalars["inv_tau"], scalars["softcap"], float(ce_weight), int(ignore_index),
        TAIL=bool(tail), HAS_LABELS=labels is not None, HAS_CE=labels is not None and ce_weight != 0,
        BLOCK_K=_pow2(k), **_SPARSE, **flags)
    return loss, lse


def _grad_buffers(n, d, v, r, has_lora, needs_weight_grad, device, zero_dh):
    """fp32 gradient buffers dh [N, d], dW [V, d] (empty without it), (G B) [N, r], dB [V, r]
    (dh stands in for the LoRA pair without LoRA: never read then)."""
    f32 = torch.float32
    dh = (torch.zeros if zero_dh else torch.empty)(n, d, device=device, dtype=f32)
    dw = torch.zeros(v, d, device=device, dtype=f32) if needs_weight_grad else torch.empty(0, device=device, dtype=f32)
    gb = torch.zeros(n, r, device=device, dtype=f32) if has_lora else dh
    db = torch.zeros(v, r, device=device, dtype=f32) if has_lora else dh
    return dh, dw, gb, db


def _launch_sparse_bwd(grad, ptrs, ids, lp, labels, lse, coef, bufs, loss, sums, n, d, r, k,
                       strides, scalars, flags, tail, ce_weight, ignore_index, needs_weight_grad):
    """The per-token sparse kernel; `loss` and `sums` given: the single pass's variant."""
    dh, dw, gb, db = bufs
    single = loss is not None
    _sparse_bwd_kernel[(n,)](
        grad.contiguous(), *ptrs, ids, lp, labels if labels is not None else ids, lse, coef,
        dh, gb, dw if needs_weight_grad else dh, db, loss if single else coef, sums if single else coef,
        d, r, k, *strides, ids.stride(0), lp.stride(0),
        scalars["inv_tau"], scalars["softcap"], float(ce_weight), int(ignore_index),
        TAIL=bool(tail), HAS_LABELS=labels is not None,
        HAS_CE=labels is not None and ce_weight != 0, WEIGHT_GRAD=bool(needs_weight_grad),
        SINGLE_PASS=single, BLOCK_K=_pow2(k), **_SPARSE, **flags)


def _launch_dense_bwd(ptrs, lse, coef, bufs, n, v, d, r, strides, scalars, flags, ieee,
                      needs_weight_grad):
    dh, dw, gb, db = bufs
    cfg = config("bwd" if needs_weight_grad else "bwd_no_wgrad", ptrs[0].dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
    _dense_bwd_kernel[grid](
        *ptrs, lse, coef, dh, gb, dw if needs_weight_grad else dh, db, n, v, d, r, *strides,
        scalars["inv_tau"], scalars["softcap"], IEEE=ieee,
        WEIGHT_GRAD=bool(needs_weight_grad), **flags, **cfg)


def linear_topk_kl_backward(grad_loss, hidden, weight, lora_a, lora_b, teacher_ids,
                            teacher_logprobs, labels, lse, lora_scale, temperature, softcap,
                            tail, ce_weight, ignore_index, needs_weight_grad):
    """(grad_hidden, grad_weight, grad_lora_a, grad_lora_b), each in its input's dtype;
    grad_weight is empty unless needs_weight_grad, the LoRA grads are empty without LoRA."""
    h, w, ha, b = _prepare(hidden, weight, lora_a, lora_b, lora_scale)
    ids = teacher_ids.contiguous()
    lp = teacher_logprobs.contiguous()
    n, d, k, r, flags, strides, ptrs, scalars = _common(h, w, ha, b, ids, temperature, softcap)
    v = w.shape[0]
    # every dh row is written (not added to) by the sparse kernel: no zeroing needed
    bufs = _grad_buffers(n, d, v, r, ha is not None, needs_weight_grad, h.device, zero_dh=False)
    if n > 0:
        coef = torch.empty(n, device=h.device, dtype=torch.float32)
        lse = lse.contiguous()
        _launch_sparse_bwd(grad_loss, ptrs, ids, lp, labels, lse, coef, bufs, None, None, n, d, r, k,
                           strides, scalars, flags, tail, ce_weight, ignore_index, needs_weight_grad)
        _launch_dense_bwd(ptrs, lse, coef, bufs, n, v, d, r, strides, scalars, flags,
                          h.dtype == torch.float32, needs_weight_grad)
    return _finish_grads(hidden, weight, lora_a, lora_b, lora_scale, h, *bufs, needs_weight_grad)


# Bytes of kept tiles ([chunk, V] in the input dtype) a trainable-head single pass may hold:
# the token chunk it sweeps at once. 2 GiB is 8192 tokens at V = 128256 in bf16, 128 token
# blocks: about one wave on an H100/H200.
_KEPT_BYTES_DEFAULT = 2 << 30


def _kept_chunk_rows(n, v, element_size, block_n):
    """Token rows per single-pass chunk (a multiple of block_n), from PDENGINE_KEPT_TILE_BYTES."""
    raw = os.environ.get("PDENGINE_KEPT_TILE_BYTES")
    budget = _KEPT_BYTES_DEFAULT
    if raw is not None:
        if not raw.isdigit() or int(raw) <= 0:
            raise ValueError(f"PDENGINE_KEPT_TILE_BYTES must be a positive whole number of bytes, got {raw!r}")
        budget = int(raw)
    rows = max(block_n, budget // max(1, v * element_size) // block_n * block_n)
    return min(rows, triton.cdiv(n, block_n) * block_n)


def linear_topk_kl_forward_backward(grad_loss, hidden, weight, lora_a, lora_b, teacher_ids,
                                    teacher_logprobs, labels, lora_scale, temperature, softcap,
                                    tail, ce_weight, ignore_index, needs_weight_grad):
    """(loss, grad_hidden, grad_weight, grad_lora_a, grad_lora_b) for a grad_loss known up
    front, in one sweep over the vocabulary per token block (`_sweep_kernel`: the lse and
    the dense hidden gradient together, 4 N d V GEMM FLOPs), then the per-token sparse
    kernel (loss, sparse terms, the per-row scale). dW and the lm_head LoRA's dB need the
    final lse of every token: the sweep keeps its tiles for a token chunk (at most
    PDENGINE_KEPT_TILE_BYTES, 2 GiB by default) and `_kept_wgrad_kernel` turns them into dW
    and dB once the chunk's lse is final: 6 N d V with a trainable lm_head, as on CPU."""
    h, w, ha, b = _prepare(hidden, weight, lora_a, lora_b, lora_scale)
    ids = teacher_ids.contiguous()
    lp = teacher_logprobs.contiguous()
    n, d, k, r, flags, strides, ptrs, scalars = _common(h, w, ha, b, ids, temperature, softcap)
    v = w.shape[0]
    ieee = h.dtype == torch.float32
    loss = torch.empty(n, device=h.device, dtype=torch.float32)
    bufs = _grad_buffers(n, d, v, r, ha is not None, needs_weight_grad, h.device, zero_dh=True)
    if n == 0:
        return (loss, *_finish_grads(hidden, weight, lora_a, lora_b, lora_scale, h, *bufs, needs_weight_grad))
    keep = bool(needs_weight_grad) or ha is not None
    cfg = config("sweep_keep" if keep else "sweep", h.dtype)  # _kept_wgrad_kernel's tiles too
    n_tiles = triton.cdiv(v, cfg["BLOCK_V"])
    chunk = _kept_chunk_rows(n, v, h.element_size(), cfg["BLOCK_N"]) if keep else n
    kept = torch.empty(chunk * v if keep else 0, device=h.device, dtype=h.dtype)
    tile_max = torch.empty(chunk * n_tiles if keep else 0, device=h.device, dtype=torch.float32)
    row_max, row_sum, coef = (torch.empty(n, device=h.device, dtype=torch.float32) for _ in range(3))
    grad_loss = grad_loss.reshape(n)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        rows = c1 - c0
        part = lambda t: None if t is None else t[c0:c1]  # noqa: E731  (row slices: views)
        c_ptrs = (h[c0:c1], w, ptrs[2][c0:c1] if ha is not None else ptrs[2], ptrs[3])
        c_bufs = (bufs[0][c0:c1], bufs[1], bufs[2][c0:c1] if ha is not None else bufs[2], bufs[3])
        _sweep_kernel[(triton.cdiv(rows, cfg["BLOCK_N"]),)](
            *c_ptrs, row_max[c0:c1], row_sum[c0:c1], c_bufs[0], c_bufs[2],
            kept if keep else row_max, tile_max if keep else row_max, rows, v, d, r, *strides, n_tiles,
            scalars["inv_tau"], scalars["softcap"], IEEE=ieee, KEEP=keep, **flags, **cfg)
        lse = row_max[c0:c1] + row_sum[c0:c1].log()
        _launch_sparse_bwd(grad_loss[c0:c1], c_ptrs, ids[c0:c1], lp[c0:c1], part(labels), lse, coef[c0:c1],
                           c_bufs, loss[c0:c1], row_sum[c0:c1], rows, d, r, k, strides, scalars, flags, tail,
                           ce_weight, ignore_index, needs_weight_grad)
        if keep:
            scale = coef[c0:c1] / row_sum[c0:c1]  # coef / s: the dense part's per-row factor
            _kept_wgrad_kernel[(triton.cdiv(rows, cfg["BLOCK_N"]), n_tiles)](
                c_ptrs[0], c_ptrs[2], kept, tile_max, row_max[c0:c1], scale, c_bufs[1], c_bufs[3],
                rows, v, d, r, strides[0], strides[2], n_tiles,
                HAS_LORA=ha is not None, WEIGHT_GRAD=bool(needs_weight_grad), IEEE=ieee,
                BLOCK_R=flags["BLOCK_R"], **cfg)
    return (loss, *_finish_grads(hidden, weight, lora_a, lora_b, lora_scale, h, *bufs, needs_weight_grad))


def _finish_grads(hidden, weight, lora_a, lora_b, lora_scale, h, dh, dw, gb, db, needs_weight_grad):
    """The LoRA terms through (G B): dh += s (G B) A, dA = s (G B)^T h; cast to input dtypes."""
    grad_a, grad_b = hidden.new_empty(0), hidden.new_empty(0)  # distinct: outputs must not alias
    if lora_a is not None:
        a32 = lora_a.float()
        dh = torch.addmm(dh, gb, a32, alpha=lora_scale)
        grad_a = (lora_scale * (gb.T @ h.float())).to(lora_a.dtype)
        grad_b = db.to(lora_b.dtype)
    grad_w = dw.to(weight.dtype) if needs_weight_grad else weight.new_empty(0)
    return dh.to(hidden.dtype), grad_w, grad_a, grad_b
