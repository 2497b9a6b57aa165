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
    _INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_V=256, BLOCK_D=64, num_warps=4, num_stages=1)
    _CONFIGS = _CONFIGS_FP32 = dict.fromkeys(("fwd", "sweep", "sweep_keep", "bwd", "bwd_no_wgrad"),
                                             _INTERPRETER_CONFIG)
    _SPARSE = dict(BLOCK_D=128, num_warps=4)
else:
    # kind: ((BLOCK_N, BLOCK_V, BLOCK_D) for 16-bit inputs, the same for fp32)
    _GPU_TILES = {
        "fwd": ((64, 128, 64), (64, 64, 32)),
        "sweep": ((64, 128, 32), (32, 64, 16)),
        # keeping the tiles too (trainable head / LoRA) spilled 264 B at 128-wide tiles and
        # 32 B at BLOCK_D 32
        "sweep_keep": ((64, 64, 16), (32, 64, 16)),
        "bwd": ((64, 64, 32), (32, 64, 16)),
        "bwd_no_wgrad": ((64, 128, 32), (32, 64, 16)),
    }

    def _gpu_config(tiles):
        return dict(zip(("BLOCK_N", "BLOCK_V", "BLOCK_D"), tiles), num_warps=8, num_stages=2)

    _CONFIGS = {kind: _gpu_config(half) for kind, (half, _) in _GPU_TILES.items()}
    _CONFIGS_FP32 = {kind: _gpu_config(fp32) for kind, (_, fp32) in _GPU_TILES.items()}
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
    acc = _gathered_dots(acc, h_ptr + row64 * stride_h, w_ptr, ids64, id_mask, stride_w, D, BLOCK_D)
    if HAS_LORA:
        acc = _gathered_dots(acc, ha_ptr + row64 * stride_ha, b_ptr, ids64, id_mask, stride_b, R, BLOCK_R)
    return acc


@triton.jit
def _gathered_dots(acc, vec_ptr, mat_ptr, ids64, id_mask, stride_mat, K, BLOCK_K: tl.constexpr):
    """acc_j + <vec, M[ids_j, :K]> for one row vector and gathered rows of M, K chunked; fp32."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        vec = tl.load(vec_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        mat = tl.load(mat_ptr + ids64[:, None] * stride_mat + ks[None, :],
                      mask=id_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(mat * vec[None, :], axis=1)
    return acc


@triton.jit
def _capped_scaled(u, softcap, inv_tau, SOFTCAP: tl.constexpr):
    """z = softcap(u) / tau."""
    if SOFTCAP:
        u = softcap * _tanh(u / softcap)
    return u * inv_tau


@triton.jit
def _online_lse_step(u, col_mask, m, s, softcap, inv_tau, SOFTCAP: tl.constexpr):
    """One vocabulary tile of the online (max m, sum s) of exp(z): returns (m_new, s_new,
    alpha = exp(m - m_new), p = exp(z - m_new)); columns past V count as z = -inf."""
    z = tl.where(col_mask[None, :], _capped_scaled(u, softcap, inv_tau, SOFTCAP), float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
    p = tl.exp(z - m_new[:, None])
    return m_new, s * alpha + tl.sum(p, axis=1), alpha, p


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
        m, s, _alpha, _p = _online_lse_step(u, col_mask, m, s, softcap, inv_tau, SOFTCAP)
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
def _token_kl(
    h_ptr, w_ptr, ha_ptr, b_ptr, ids_ptr, lp_ptr, lse_ptr, row, D, R, K,
    stride_h, stride_w, stride_ha, stride_b, stride_ids, stride_lp, inv_tau, softcap,
    HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, TAIL: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One token's teacher slots: (ks, k_mask, ids, u at the ids, lse, kl, c, corr), the
    last three from `_teacher_terms`; shared by the per-token forward and backward."""
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    ids = tl.load(ids_ptr + row.to(tl.int64) * stride_ids + ks, mask=k_mask, other=0)
    u = _sparse_logits(h_ptr, w_ptr, ha_ptr, b_ptr, row, ids, k_mask,
                       D, R, stride_h, stride_w, stride_ha, stride_b,
                       HAS_LORA, BLOCK_K, BLOCK_D, BLOCK_R)
    lse = tl.load(lse_ptr + row)
    logq = _capped_scaled(u, softcap, inv_tau, SOFTCAP) - lse
    kl, c, corr = _teacher_terms(lp_ptr, row, ks, k_mask, stride_lp, logq, TAIL)
    return ks, k_mask, ids, u, lse, kl, c, corr


@triton.jit
def _label_logit(
    h_ptr, w_ptr, ha_ptr, b_ptr, row, ks, label, counted, D, R,
    stride_h, stride_w, stride_ha, stride_b, inv_tau, softcap,
    HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The CE label as one more sparse entry: slot 0 of a second BLOCK_K-wide vector,
    masked elsewhere and for a token not counted, so every tile stays a power of two.
    Returns (y_ids int64, y_mask, u at the label, z_y = its capped, scaled logit or 0)."""
    # an int test keeps the mask a plain tensor compare, which the interpreter needs
    y_mask = (ks + tl.where(counted, 0, 1)) == 0
    y_ids = tl.where(y_mask, label, 0).to(tl.int64)
    u_y = _sparse_logits(h_ptr, w_ptr, ha_ptr, b_ptr, row, y_ids, y_mask,
                         D, R, stride_h, stride_w, stride_ha, stride_b,
                         HAS_LORA, BLOCK_K, BLOCK_D, BLOCK_R)
    z_y = tl.sum(tl.where(y_mask, _capped_scaled(u_y, softcap, inv_tau, SOFTCAP), 0.0), axis=0)
    return y_ids, y_mask, u_y, z_y


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
    ks, k_mask, ids, u, lse, loss, c, corr = _token_kl(
        h_ptr, w_ptr, ha_ptr, b_ptr, ids_ptr, lp_ptr, lse_ptr, row, D, R, K,
        stride_h, stride_w, stride_ha, stride_b, stride_ids, stride_lp, inv_tau, softcap,
        HAS_LORA, SOFTCAP, TAIL, BLOCK_K, BLOCK_D, BLOCK_R)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        counted = label != ignore_index
        if HAS_CE:
            y_ids, y_mask, u_y, z_y = _label_logit(
                h_ptr, w_ptr, ha_ptr, b_ptr, row, ks, label, counted, D, R,
                stride_h, stride_w, stride_ha, stride_b, inv_tau, softcap,
                HAS_LORA, SOFTCAP, BLOCK_K, BLOCK_D, BLOCK_R)
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
    ks, k_mask, ids, u, lse, loss, c, corr = _token_kl(
        h_ptr, w_ptr, ha_ptr, b_ptr, ids_ptr, lp_ptr, lse_ptr, row, D, R, K,
        stride_h, stride_w, stride_ha, stride_b, stride_ids, stride_lp, inv_tau, softcap,
        HAS_LORA, SOFTCAP, TAIL, BLOCK_K, BLOCK_D, BLOCK_R)
    g = tl.load(grad_ptr + row).to(tl.float32) * inv_tau  # dL/du = dL/dz / tau
    y_val = tl.zeros((BLOCK_K,), dtype=tl.float32)  # no label: an all-masked label slot
    y_ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    y_mask = ks < 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        counted = label != ignore_index
        g = tl.where(counted, g, 0.0)
        if HAS_CE:
            c += ce_weight
            y_ids, y_mask, u_y, z_y = _label_logit(
                h_ptr, w_ptr, ha_ptr, b_ptr, row, ks, label, counted, D, R,
                stride_h, stride_w, stride_ha, stride_b, inv_tau, softcap,
                HAS_LORA, SOFTCAP, BLOCK_K, BLOCK_D, BLOCK_R)
            y_val = tl.where(y_mask, -ce_weight * g * _softcap_grad(u_y, softcap, SOFTCAP), 0.0)
            loss += ce_weight * (lse - z_y)
        loss = tl.where(counted, loss, 0.0)
    if SINGLE_PASS:
        tl.store(loss_ptr + row, loss)
        dense_scale = g * c / tl.load(sum_ptr + row)
    else:
        dense_scale = 0.0
    tl.store(coef_ptr + row, g * c)
    k_val = tl.where(k_mask, g * corr * _softcap_grad(u, softcap, SOFTCAP), 0.0)
    ids64 = ids.to(tl.int64)
    _scatter_part(w_ptr, stride_w, h_ptr + row64 * stride_h, dh_ptr + row64 * D, dw_ptr, ids64, k_val, k_mask,
                  y_ids, y_val, y_mask, dense_scale, D, WEIGHT_GRAD, SINGLE_PASS, BLOCK_D)
    if HAS_LORA:
        _scatter_part(b_ptr, stride_b, ha_ptr + row64 * stride_ha, gb_ptr + row64 * R, db_ptr, ids64, k_val, k_mask,
                      y_ids, y_val, y_mask, dense_scale, R, True, SINGLE_PASS, BLOCK_R)


@triton.jit
def _scatter_part(src_ptr, stride_src, act_ptr, out_ptr, grad_ptr, ids, k_val, k_mask, y_ids, y_val, y_mask,
                  dense_scale, K, GRAD: tl.constexpr, DENSE_IN: tl.constexpr, BLOCK_K: tl.constexpr):
    """One part (the d columns, or the LoRA rank's r) of the sparse part of G at the ids
    and the label, K chunked: the token's row out (dh or (G B), at out_ptr) = sum_j val_j
    src[id_j] (plus dense_scale * out when DENSE_IN: it holds the sweep's dense part; else
    the dense kernel adds it later), a plain store (the row is this program's); GRAD: grad
    (dW or dB) [id_j] += val_j * the token's act row (h or hA), atomics (rows shared)."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = ks < K
        sk = tl.load(src_ptr + ids[:, None] * stride_src + ks[None, :],
                     mask=k_mask[:, None] & mask[None, :], other=0.0).to(tl.float32)
        sy = tl.load(src_ptr + y_ids[:, None] * stride_src + ks[None, :],
                     mask=y_mask[:, None] & mask[None, :], other=0.0).to(tl.float32)
        out = tl.sum(k_val[:, None] * sk, axis=0) + tl.sum(y_val[:, None] * sy, axis=0)
        if DENSE_IN:
            out += dense_scale * tl.load(out_ptr + ks, mask=mask, other=0.0)
        tl.store(out_ptr + ks, out, mask=mask)
        if GRAD:
            act = tl.load(act_ptr + ks, mask=mask, other=0.0).to(tl.float32)
            tl.atomic_add(grad_ptr + ids[:, None] * K + ks[None, :], k_val[:, None] * act[None, :],
                          mask=k_mask[:, None] & mask[None, :])
            tl.atomic_add(grad_ptr + y_ids[:, None] * K + ks[None, :], y_val[:, None] * act[None, :],
                          mask=y_mask[:, None] & mask[None, :])


@triton.jit
def _gemm_into(g, src_ptr, src_idx, src_mask, stride_src, out_ptr, out_idx, out_mask, K, alpha,
               RESCALE: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[out_idx, :K] += g @ src[src_idx, :K] for one tile g [BLOCK_M, len(src_idx)] (in
    the tensor-core input dtype), K in BLOCK_K chunks; out is fp32, row stride K. fp32
    atomics (out rows shared between programs), or, RESCALE, the program's own rows:
    out = alpha[:, None] * out + g @ src (the sweep's flash-style accumulator)."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        src = tl.load(src_ptr + src_idx[:, None] * stride_src + ks[None, :],
                      mask=src_mask[:, None] & k_mask[None, :], other=0.0)
        out_ptrs = out_ptr + out_idx[:, None] * K + ks[None, :]
        mask = out_mask[:, None] & k_mask[None, :]
        if RESCALE:
            acc = tl.load(out_ptrs, mask=mask, other=0.0) * alpha[:, None]
            tl.store(out_ptrs, dot(g, src, acc, IEEE), mask=mask)
        else:
            tl.atomic_add(out_ptrs, dot(g, src, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), IEEE), mask=mask)


@triton.jit
def _gemm_into_parts(g, d_src_ptr, r_src_ptr, d_out_ptr, r_out_ptr, src_idx, src_mask, out_idx, out_mask,
                     D, R, stride_d_src, stride_r_src, alpha,
                     D_PART: tl.constexpr, R_PART: tl.constexpr, RESCALE: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """`_gemm_into` for both parts of an extended operand: the d columns of [W | B] or
    [h | hA] (D_PART) and the LoRA rank's r columns (R_PART). G [W | B] gives dh and (G B),
    G^T [h | hA] gives dW and dB."""
    if D_PART:
        _gemm_into(g, d_src_ptr, src_idx, src_mask, stride_d_src, d_out_ptr, out_idx, out_mask, D, alpha,
                   RESCALE, IEEE, BLOCK_M, BLOCK_D)
    if R_PART:
        _gemm_into(g, r_src_ptr, src_idx, src_mask, stride_r_src, r_out_ptr, out_idx, out_mask, R, alpha,
                   RESCALE, IEEE, BLOCK_M, BLOCK_R)


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
    _gemm_into_parts(g_in, w_ptr, b_ptr, dh_ptr, gb_ptr, cols64, col_mask, rows64, row_mask, D, R,
                     stride_w, stride_b, 1.0, True, HAS_LORA, False, IEEE, BLOCK_N, BLOCK_D, BLOCK_R)
    _gemm_into_parts(g_in_t, h_ptr, ha_ptr, dw_ptr, db_ptr, rows64, row_mask, cols64, col_mask, D, R,
                     stride_h, stride_ha, 1.0, WEIGHT_GRAD, HAS_LORA, False, IEEE, BLOCK_V, BLOCK_D, BLOCK_R)


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
        m, s, alpha, p = _online_lse_step(u, col_mask, m, s, softcap, inv_tau, SOFTCAP)
        gp = (p * _softcap_grad(u, softcap, SOFTCAP)).to(w_ptr.dtype.element_ty)
        if KEEP:
            tl.store(kept_ptr + rows64[:, None] * V + cols64[None, :], gp,
                     mask=row_mask[:, None] & col_mask[None, :])
            tl.store(tile_max_ptr + rows64 * n_tiles + v0 // BLOCK_V, m, mask=row_mask)
        # acc = alpha acc + gp [W | B]; alpha is 0 on the first tile, where acc is 0 anyway
        _gemm_into_parts(gp, w_ptr, b_ptr, dh_ptr, gb_ptr, cols64, col_mask, rows64, row_mask, D, R,
                         stride_w, stride_b, alpha, True, HAS_LORA, True, IEEE, BLOCK_N, BLOCK_D, BLOCK_R)
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
    _gemm_into_parts(g_in_t, h_ptr, ha_ptr, dw_ptr, db_ptr, rows64, row_mask, cols64, col_mask, D, R,
                     stride_h, stride_ha, 1.0, WEIGHT_GRAD, HAS_LORA, False, IEEE, BLOCK_V, BLOCK_D, BLOCK_R)


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
