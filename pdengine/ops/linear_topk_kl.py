"""Front-end of the fused lm_head + top-k KL loss (docs/DESIGN.md, "Fused loss").

`pdengine::linear_topk_kl` / `pdengine::linear_topk_kl_backward` /
`pdengine::linear_topk_kl_forward_backward` are custom ops (schemas in `_library.SCHEMAS`):
CUDA runs the Triton kernels of `kernels/linear_topk_kl.py`, CPU runs the C++ kernels of
`csrc/` (or, when those are not built, the fallback `_library` picks). This module adds the
fake kernels, the autograd formulas, the argument checks, the reductions and the public
function / Module.

Two autograd paths. `reduction="none"`: the forward op returns the per-token loss and lse,
the backward op recomputes the logit tiles. A reduced loss that will be differentiated:
`_SinglePassLoss` calls the single-pass op with the reduction's per-token weights, keeps
the gradients, and its backward only scales them.

Input checks. Shapes, dtypes, devices and hyper-parameters are checked on the host for
free. The value checks (teacher ids and labels inside [0, V), finite teacher log-probs)
need the data: they run as one fused on-device reduction followed by a single host read of
one small tensor, only when `validate=True` (the default) and never while torch.compile
traces. A trainer that checked its teacher cache once at load time passes
`validate=False` to keep the training step free of host syncs.
"""
from __future__ import annotations

import torch
from torch import nn

from pdengine import reference
from pdengine.ops import _library
from pdengine.ops._checks import check_float_tensor, check_input_and_weight, check_number

_INT_DTYPES = (torch.int32, torch.int64)
MODES = reference.MODES
REDUCTIONS = reference.REDUCTIONS


# ---------------------------------------------------------------------------- checks


def _check_shapes(hidden, weight, teacher_ids, teacher_logprobs, labels, lora_a, lora_b):
    """Host-side checks of every tensor argument; returns (N, V)."""
    check_input_and_weight("hidden", hidden, weight, "the hidden size")
    v, d = weight.shape
    n = hidden.numel() // d if d else 0
    if not isinstance(teacher_ids, torch.Tensor) or teacher_ids.dtype not in _INT_DTYPES:
        raise ValueError("teacher_ids must be an int32/int64 tensor of shape [..., k]")
    if teacher_ids.dim() < 1 or teacher_ids.numel() != n * teacher_ids.shape[-1]:
        raise ValueError(f"teacher_ids must have shape [N={n}, k] (leading dims as hidden's), got {tuple(teacher_ids.shape)}")
    k = teacher_ids.shape[-1]
    if k < 1:
        raise ValueError("teacher_ids must hold at least one id per token (k >= 1)")
    if k > v:
        raise ValueError(f"k = teacher_ids.shape[-1] ({k}) must be <= the vocabulary size V ({v})")
    check_float_tensor("teacher_logprobs", teacher_logprobs)
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs must have the shape of teacher_ids {tuple(teacher_ids.shape)}, got {tuple(teacher_logprobs.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in _INT_DTYPES:
            raise ValueError("labels must be an int32/int64 tensor of shape [N] or None")
        if labels.numel() != n:
            raise ValueError(f"labels must have N={n} elements (one per token), got shape {tuple(labels.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (got only " + ("lora_a)" if lora_b is None else "lora_b)"))
    if lora_a is not None:
        check_float_tensor("lora_a", lora_a, 2)
        check_float_tensor("lora_b", lora_b, 2)
        r = lora_a.shape[0]
        if r < 1 or lora_a.shape[1] != d:
            raise ValueError(f"lora_a must have shape [r >= 1, {d}], got {tuple(lora_a.shape)}")
        if tuple(lora_b.shape) != (v, r):
            raise ValueError(f"lora_b must have shape [{v}, {r}], got {tuple(lora_b.shape)}")
    for name, t in (("weight", weight), ("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs),
                    ("labels", labels), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    return n, v


def _check_hyper(lora_scale, temperature, softcap, mode, ce_weight, ignore_index, reduction):
    check_number("lora_scale", lora_scale)
    check_number("temperature", temperature, positive=True)
    if softcap is not None:
        check_number("softcap", softcap, positive=True)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_number("ce_weight", ce_weight, nonnegative=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_values(teacher_ids, teacher_logprobs, labels, vocab, ce_weight, ignore_index):
    """ids/labels in [0, V) and finite log-probs: one fused device reduction, one host read."""
    flags = [
        ((teacher_ids < 0) | (teacher_ids >= vocab)).any(),
        (~torch.isfinite(teacher_logprobs)).any(),
    ]
    if labels is not None and ce_weight:
        flags.append(((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).any())
    bad = torch.stack(flags).cpu()  # the single host sync of a validated call
    if bad[0]:
        raise ValueError(f"teacher_ids must lie in [0, V={vocab})")
    if bad[1]:
        raise ValueError("teacher_logprobs must be finite (no NaN/inf; the teacher cache is corrupt?)")
    if len(flags) > 2 and bad[2]:
        raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}")


# ---------------------------------------------------------------- CPU fallback kernels


def _reference_loss_and_lse(hidden, weight, lora_a, lora_b, ids, lp, labels, lora_scale,
                            temperature, softcap, tail, ce_weight, ignore_index):
    loss = reference.linear_topk_kl(
        hidden, weight, ids, lp, labels=labels, lora_a=lora_a, lora_b=lora_b,
        lora_scale=lora_scale, temperature=temperature, softcap=softcap or None,
        mode="tail" if tail else "renorm", ce_weight=ce_weight, ignore_index=ignore_index,
        reduction="none")
    u = reference.student_logits(hidden, weight, lora_a, lora_b, lora_scale, softcap or None)
    return loss, torch.logsumexp(u / temperature, dim=-1)


def _reference_forward(*args):
    loss, lse = _reference_loss_and_lse(*args)
    return loss.float(), lse.float()


def _reference_backward(grad_loss, hidden, weight, lora_a, lora_b, ids, lp, labels, lse,
                        lora_scale, temperature, softcap, tail, ce_weight, ignore_index,
                        needs_weight_grad):
    """Gradients of the reference by autograd (the specification, not a fast path)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None
                  for t in (hidden, weight, lora_a, lora_b)]
        loss, _ = _reference_loss_and_lse(*leaves, ids, lp, labels, lora_scale, temperature,
                                          softcap, tail, ce_weight, ignore_index)
        wanted = [leaves[0]] + ([leaves[1]] if needs_weight_grad else []) + [t for t in leaves[2:] if t is not None]
        grads = list(torch.autograd.grad(loss, wanted, grad_loss.to(loss.dtype), allow_unused=True))
    grad_h = grads.pop(0).to(hidden.dtype)
    grad_w = grads.pop(0).to(weight.dtype) if needs_weight_grad else weight.new_empty(0)
    grad_a = grads.pop(0).to(lora_a.dtype) if lora_a is not None else hidden.new_empty(0)
    grad_b = grads.pop(0).to(lora_b.dtype) if lora_b is not None else hidden.new_empty(0)
    return grad_h, grad_w, grad_a, grad_b


def _reference_forward_backward(grad_loss, *args):
    *inputs, needs_weight_grad = args
    loss, lse = _reference_forward(*inputs)
    grads = _reference_backward(grad_loss, *inputs[:7], lse, *inputs[7:], needs_weight_grad)
    return (loss, *grads)


def _triton_forward(*args):
    from pdengine.kernels import linear_topk_kl as kernels  # lazy: triton is heavy to import

    return kernels.linear_topk_kl(*args)


def _triton_backward(*args):
    from pdengine.kernels import linear_topk_kl as kernels

    return kernels.linear_topk_kl_backward(*args)


def _triton_forward_backward(*args):
    from pdengine.kernels import linear_topk_kl as kernels

    return kernels.linear_topk_kl_forward_backward(*args)


_library.register_cuda("linear_topk_kl", _triton_forward)
_library.register_cuda("linear_topk_kl_backward", _triton_backward)
_library.register_cpu_fallback("linear_topk_kl", _triton_forward, _reference_forward)
_library.register_cpu_fallback("linear_topk_kl_backward", _triton_backward, _reference_backward)
_library.register_cuda("linear_topk_kl_forward_backward", _triton_forward_backward)
_library.register_cpu_fallback("linear_topk_kl_forward_backward", _triton_forward_backward,
                               _reference_forward_backward)


# ------------------------------------------------------------------------ fake kernels


@torch.library.register_fake("pdengine::linear_topk_kl")
def _linear_topk_kl_fake(hidden, weight, lora_a, lora_b, ids, lp, labels, lora_scale,
                         temperature, softcap, tail, ce_weight, ignore_index):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.register_fake("pdengine::linear_topk_kl_backward")
def _linear_topk_kl_backward_fake(grad_loss, hidden, weight, lora_a, lora_b, ids, lp, labels,
                                  lse, lora_scale, temperature, softcap, tail, ce_weight,
                                  ignore_index, needs_weight_grad):
    grad_w = torch.empty_like(weight) if needs_weight_grad else weight.new_empty(0)
    grad_a = torch.empty_like(lora_a) if lora_a is not None else hidden.new_empty(0)
    grad_b = torch.empty_like(lora_b) if lora_b is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), grad_w, grad_a, grad_b


@torch.library.register_fake("pdengine::linear_topk_kl_forward_backward")
def _linear_topk_kl_forward_backward_fake(grad_loss, hidden, weight, lora_a, lora_b, ids, lp, labels,
                                          lora_scale, temperature, softcap, tail, ce_weight,
                                          ignore_index, needs_weight_grad):
    loss = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return (loss, *_linear_topk_kl_backward_fake(grad_loss, hidden, weight, lora_a, lora_b, ids, lp,
                                                 labels, loss, lora_scale, temperature, softcap, tail,
                                                 ce_weight, ignore_index, needs_weight_grad))


# ---------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    hidden, weight, lora_a, lora_b, ids, lp, labels, *hyper = inputs
    _loss, lse = output
    ctx.save_for_backward(hidden, weight, lora_a, lora_b, ids, lp, labels, lse)
    ctx.hyper = hyper  # lora_scale, temperature, softcap, tail, ce_weight, ignore_index


def _backward(ctx, grad_loss, _grad_lse):
    # lse is an auxiliary output saved for the backward; it is not differentiable.
    hidden, weight, lora_a, lora_b, ids, lp, labels, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_h, grad_w, grad_a, grad_b = torch.ops.pdengine.linear_topk_kl_backward(
        grad_loss.float().contiguous(), hidden, weight, lora_a, lora_b, ids, lp, labels, lse,
        *ctx.hyper, bool(needs[1]))
    return (
        grad_h if needs[0] else None,
        grad_w if needs[1] else None,
        grad_a if needs[2] else None,
        grad_b if needs[3] else None,
        None, None, None, None, None, None, None, None, None,
    )


torch.library.register_autograd("pdengine::linear_topk_kl", _backward, setup_context=_setup_context)


class _SinglePassLoss(torch.autograd.Function):
    """A reduced loss whose gradients are computed in the forward pass.

    With reduction "mean" or "sum" the weight of each token's loss in the result is known
    before the backward: 1/count or 1. The forward then runs the single-pass op for that
    grad_loss and keeps (dh, dW, dA, dB); the backward only scales them by the incoming
    scalar gradient. Exact, not an approximation: the result is linear in the per-token
    losses. Both backends run 4 N d V GEMM FLOPs with a frozen lm_head instead of forward +
    backward's 6, and 6 instead of 8 with a trainable one: C++ keeps a token chunk's logit
    tiles between its lse pass and its gradient pass; Triton makes one sweep that
    accumulates the hidden gradient with online rescaling and keeps the chunk's tiles for
    dW (PDENGINE_KEPT_TILE_BYTES, 2 GiB by default).
    The gradients live from the forward to the backward, as in Liger-Kernel's fused linear
    cross-entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, lora_a, lora_b, ids, lp, labels, hyper, reduction):
        ignore_index = hyper[-1]
        grad_loss = _token_weights(hidden.shape[0], hidden.device, labels, ignore_index, reduction)
        loss, *grads = torch.ops.pdengine.linear_topk_kl_forward_backward(
            grad_loss, hidden, weight, lora_a, lora_b, ids, lp, labels, *hyper, weight.requires_grad)
        ctx.save_for_backward(*grads)
        return _reduce(loss, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        # Always a new tensor, even for grad_out == 1: autograd may store a returned tensor as
        # .grad itself, and a later in-place accumulation would then corrupt the kept
        # gradients for another backward through this graph (retain_graph=True).
        # An input that needs a gradient got one from the op (weight: needs_weight_grad was
        # its requires_grad; LoRA factors: present), empty only when N = 0.
        grads = [g * grad_out.to(g.dtype) if need else None
                 for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        return (*grads, None, None, None, None, None)


# -------------------------------------------------------------------------- public API


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
    validate=True,
):
    """Fused lm_head + forward KL(teacher || student) over the teacher's top-k (+ CE).

    The student logits `u = h W^T + s (h A^T) B^T` (soft-capped, divided by temperature)
    are computed tile by tile and never stored: memory beyond the inputs is O(N k).

    Args:
        hidden: `[..., d]` student final hidden states (leading dims are flattened to N).
        weight: `[V, d]` lm_head weight; its gradient is computed only if it requires grad.
        teacher_ids: `[..., k]` int32/int64 teacher top-k ids (same leading dims).
        teacher_logprobs: `[..., k]` the teacher's full-vocabulary log-probs at `temperature`.
        labels: optional `[...]` int labels: tokens whose label is `ignore_index` count for
            nothing (KL included); the CE term uses them when `ce_weight > 0`.
        lora_a, lora_b: optional lm_head LoRA factors `[r, d]`, `[V, r]`; scale `lora_scale`.
        temperature: distillation temperature (> 0) applied to the student logits.
        softcap: optional logit soft-cap `c` (`c * tanh(u / c)`, Gemma 2 and later).
        mode: "tail" (keeps the teacher's mass outside its top-k) or "renorm".
        ce_weight: weight of the added cross-entropy term on `labels` (>= 0).
        reduction: "mean" over counted tokens (0 if none), "sum", or "none" (`[N]`).
        validate: check id/label ranges and finite log-probs (one host sync; skipped under
            torch.compile). Pass False in a training loop whose cache was checked once.

    Returns: a float32 scalar, or `[N]` float32 for reduction="none".

    A "mean" or "sum" loss taken with grad enabled computes its gradients right away, in
    one pass (see `_SinglePassLoss`): call `.backward()` on it, or compute it under
    `torch.no_grad()` when only the value is wanted.
    """
    n, v = _check_shapes(hidden, weight, teacher_ids, teacher_logprobs, labels, lora_a, lora_b)
    _check_hyper(lora_scale, temperature, softcap, mode, ce_weight, ignore_index, reduction)
    d = weight.shape[1]
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(n, k)
    lp = teacher_logprobs.reshape(n, k)
    labels = labels.reshape(n) if labels is not None else None
    if validate and not torch.compiler.is_compiling():
        _check_values(ids, lp, labels, v, ce_weight, ignore_index)
    hidden = hidden.reshape(n, d)
    hyper = (float(lora_scale), float(temperature), float(softcap or 0.0), mode == "tail",
             float(ce_weight), int(ignore_index))
    if _use_single_pass(reduction, hidden, weight, lora_a, lora_b):
        return _SinglePassLoss.apply(hidden, weight, lora_a, lora_b, ids, lp, labels, hyper, reduction)
    loss, _lse = torch.ops.pdengine.linear_topk_kl(hidden, weight, lora_a, lora_b, ids, lp, labels, *hyper)
    return _reduce(loss, labels, ignore_index, reduction)


def _use_single_pass(reduction, hidden, *params):
    """Gradients in the forward pass: for a reduced loss that will be differentiated."""
    return (reduction != "none" and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (hidden, *params)))


def _mean_count(n, labels, ignore_index):
    """What the mean divides by: the counted tokens (label != ignore_index), at least 1."""
    if labels is None:
        return max(n, 1)
    return (labels != ignore_index).sum().clamp(min=1)


def _reduce(loss, labels, ignore_index, reduction):
    """Reductions on the device (no host sync)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / _mean_count(loss.shape[0], labels, ignore_index)


def _token_weights(n, device, labels, ignore_index, reduction):
    """d _reduce(loss) / d loss_i for every token: the single pass's grad_loss."""
    ones = torch.ones(n, device=device)
    return ones if reduction == "sum" else ones / _mean_count(n, labels, ignore_index)


class LinearTopKKL(nn.Module):
    """Module form of `linear_topk_kl`: stores the hyper-parameters, takes the tensors."""

    def __init__(self, *, temperature=1.0, softcap=None, mode="tail", ce_weight=0.0,
                 ignore_index=-100, reduction="mean", lora_scale=1.0, validate=True):
        super().__init__()
        _check_hyper(lora_scale, temperature, softcap, mode, ce_weight, ignore_index, reduction)
        self.temperature = temperature
        self.softcap = softcap
        self.mode = mode
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.lora_scale = lora_scale
        self.validate = validate

    def forward(self, hidden, weight, teacher_ids, teacher_logprobs, labels=None, lora_a=None, lora_b=None):
        return linear_topk_kl(
            hidden, weight, teacher_ids, teacher_logprobs, labels=labels, lora_a=lora_a,
            lora_b=lora_b, lora_scale=self.lora_scale, temperature=self.temperature,
            softcap=self.softcap, mode=self.mode, ce_weight=self.ce_weight,
            ignore_index=self.ignore_index, reduction=self.reduction, validate=self.validate)

    def extra_repr(self):
        return (f"mode={self.mode!r}, temperature={self.temperature}, softcap={self.softcap}, "
                f"ce_weight={self.ce_weight}, reduction={self.reduction!r}")
