"""Plain-torch reference implementations of every pdengine op.

These materialize everything (the `[N, V]` logits included) and lean on autograd for
gradients. They are the specification: every fast version (Triton in `kernels/`, C++ in
`csrc/`) is tested against them in float64. Keep them obvious rather than fast.

The math is in docs/DESIGN.md, "Fused loss", "LoRA matmul" and "Teacher top-k".
"""
from __future__ import annotations

import torch

# Below this, `S = 1 - sum_j q[ids_j]` (the student's mass outside the teacher's top-k)
# is clamped in tail mode; the clamp also stops the gradient of the tail term, exactly
# as autograd does here. The kernels use the same constant.
TAIL_MASS_EPS = 1e-6

MODES = ("tail", "renorm")
REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (tests); everything else is computed in float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def student_logits(hidden, weight, lora_a=None, lora_b=None, lora_scale=1.0, softcap=None):
    """u = h W^T + s (h A^T) B^T, then the optional soft-cap c * tanh(u / c)."""
    dtype = _compute_dtype(hidden, weight)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    u = h @ weight.to(dtype).T
    if lora_a is not None:
        u = u + lora_scale * (h @ lora_a.to(dtype).T) @ lora_b.to(dtype).T
    if softcap:
        u = softcap * torch.tanh(u / softcap)
    return u


def linear_topk_kl(
    hidden,
    weight,
    teacher_ids,
    teacher_logprobs,
    *,
    labels=None,
    lora_a=None,
    lora_b=None,
    lora_scale=1.0,
    temperature=1.0,
    softcap=None,
    mode="tail",
    ce_weight=0.0,
    ignore_index=-100,
    reduction="mean",
):
    """Forward KL(teacher || student) over the teacher's top-k, plus an optional CE term.

    hidden [..., d] (flattened to [N, d]), weight [V, d], lora_a [r, d], lora_b [V, r],
    teacher_ids [N, k], teacher_logprobs [N, k] (full-vocabulary log-probs at `temperature`),
    labels [N] or None. Returns a scalar (mean over counted tokens, or sum) or [N] (none).
    """
    u = student_logits(hidden, weight, lora_a, lora_b, lora_scale, softcap)
    logq = torch.log_softmax(u / temperature, dim=-1)
    ids = teacher_ids.reshape(logq.shape[0], -1).long()
    lp = teacher_logprobs.reshape(ids.shape).to(logq.dtype)
    logq_ids = logq.gather(1, ids)

    if mode == "renorm":
        logp_hat = torch.log_softmax(lp, dim=-1)
        loss = (logp_hat.exp() * (logp_hat - logq_ids)).sum(-1)
    elif mode == "tail":
        p = lp.exp()
        tail_teacher = (1 - p.sum(-1)).clamp(min=0)  # R: teacher mass outside its top-k
        tail_student = (1 - logq_ids.exp().sum(-1)).clamp(min=TAIL_MASS_EPS)  # S
        loss = (p * (lp - logq_ids)).sum(-1)
        loss = loss + torch.xlogy(tail_teacher, tail_teacher) - tail_teacher * tail_student.log()
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    counted = torch.ones_like(loss, dtype=torch.bool)
    if labels is not None:
        labels = labels.reshape(-1)
        counted = labels != ignore_index
        if ce_weight:
            safe = torch.where(counted, labels, 0).long()
            loss = loss - ce_weight * logq.gather(1, safe[:, None])[:, 0]
    loss = torch.where(counted, loss, torch.zeros_like(loss))

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / counted.sum().clamp(min=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def teacher_topk(hidden, weight, k, temperature=1.0, softcap=None):
    """The teacher's top-k next-token ids and their full-vocabulary log-probs at `temperature`.

    Returns ids [N, k] int64 sorted by descending probability, logprobs [N, k] float32
    (float64 when the inputs are float64).
    """
    u = student_logits(hidden, weight, softcap=softcap)
    logq = torch.log_softmax(u / temperature, dim=-1)
    values, ids = logq.topk(k, dim=-1, sorted=True)
    out_dtype = torch.float64 if logq.dtype == torch.float64 else torch.float32
    return ids, values.to(out_dtype)


def _mulmod32(h, c):
    """(h * c) mod 2**32 for int64 tensors h < 2**32 and a constant c < 2**32, without
    int64 overflow (split c into 16-bit halves)."""
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (hi + h * (c & 0xFFFF)) & 0xFFFFFFFF


DROPOUT_INDEX_MUL, DROPOUT_SEED_MUL = 0x9E3779B1, 0x85EBCA6B  # lora.dropout_seed's shift relies on them


def dropout_keep_mask(shape, p, seed, device=None):
    """LoRA dropout's keep-mask, a pure function of (seed, flat element index).

    Every backend (Triton, C++, this reference) computes the same bits, so the forward
    never stores a mask or a dropped copy of x, and tests can compare backends exactly:
        h = (i * 0x9E3779B1 + seed * 0x85EBCA6B + 0x27D4EB2F) mod 2**32   (i < 2**32)
        murmur3 finaliser: h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
        keep = (h >> 8) >= floor(p * 2**24)
    """
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, dtype=torch.int64, device=device) & 0xFFFFFFFF
    s = int(seed) & 0xFFFFFFFF
    h = (_mulmod32(i, DROPOUT_INDEX_MUL) + (s * DROPOUT_SEED_MUL) + 0x27D4EB2F) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = _mulmod32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mulmod32(h, 0xC2B2AE35)
    h = h ^ (h >> 16)
    threshold = int(p * (1 << 24))
    return ((h >> 8) >= threshold).reshape(shape)


def lora_linear(x, weight, lora_a, lora_b, scale, bias=None, dropout=0.0, seed=0):
    """y = x W^T (+ bias) + s * (dropout(x) A^T) B^T, PEFT's `B(A(dropout(x)))` semantics.

    x [..., d_in], weight [d_out, d_in], lora_a [r, d_in], lora_b [d_out, r].
    Dropout uses `dropout_keep_mask(x.shape, dropout, seed)` and scales kept values by 1/(1-p).
    """
    dtype = _compute_dtype(x, weight)
    xc = x.to(dtype)
    y = xc @ weight.to(dtype).T
    if bias is not None:
        y = y + bias.to(dtype)
    xd = xc
    if dropout > 0:
        keep = dropout_keep_mask(x.shape, dropout, seed, device=x.device)
        xd = torch.where(keep, xc / (1 - dropout), torch.zeros_like(xc))
    y = y + scale * (xd @ lora_a.to(dtype).T) @ lora_b.to(dtype).T
    return y.to(x.dtype)
