"""Front-end of the `pdengine::teacher_topk` op: the teacher's top-k next-token log-probs.

From teacher hidden states (after the final norm) and the lm_head weight, the op returns
the k most probable next-token ids and their log-probabilities at `temperature`,
normalised over the *full* vocabulary, without materializing the `[N, V]` logits
(docs/DESIGN.md, "Teacher top-k").

Backends (see pdengine/ops/_library.py): CUDA runs the Triton kernel
(`pdengine.kernels.teacher_topk`); CPU runs the C++ kernel from `pdengine._C`, or, when
that is not built, the Triton interpreter (TRITON_INTERPRET=1) or the plain-torch
reference.

No autograd: the teacher is frozen, so the op has no backward and its outputs never
require grad. Calling it on tensors that require grad is fine (nothing flows back).
"""
from __future__ import annotations

import numbers

import torch

from pdengine import reference
from pdengine.ops import _library
from pdengine.ops._checks import FLOAT_DTYPES

_OP_NAME = "teacher_topk"


def _check_args(hidden, weight, k, temperature, softcap):
    """Raise ValueError naming the offending argument; nothing deep inside the kernel."""
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., d] with d > 0, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, d] with V > 0, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight's hidden size {weight.shape[1]} does not match hidden's last dimension "
            f"{hidden.shape[-1]} (weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)})"
        )
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 0 < k <= weight.shape[0]:
        raise ValueError(f"k must be in [1, V={weight.shape[0]}], got {k}")
    if not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not softcap >= 0):
        raise ValueError(f"softcap must be None, 0 (off) or a positive number, got {softcap!r}")


def teacher_topk(hidden, weight, k, temperature=1.0, softcap=None):
    """The teacher's top-k next-token ids and their full-vocabulary log-probs.

    Args:
        hidden: `[..., d]` teacher hidden states after the final norm (fp16/bf16/fp32/fp64).
        weight: `[V, d]` lm_head weight, same dtype and device as `hidden`.
        k: how many tokens to keep, 1 <= k <= V.
        temperature: the distribution is `softmax(softcap(hidden @ weight.T) / temperature)`.
        softcap: optional logit soft-cap c (`c * tanh(u / c)`, Gemma 2 and later); None or 0
            means none.

    Returns:
        `(ids [..., k] int64, logprobs [..., k] float32)`, sorted by descending probability
        (the Triton kernel breaks exact ties by the smaller id); `logprobs` are normalised
        over the full vocabulary.

    Not differentiable (the teacher is frozen); the outputs never require grad.
    """
    _check_args(hidden, weight, k, temperature, softcap)
    lead_shape = hidden.shape[:-1]
    flat_hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    ids, logprobs = torch.ops.pdengine.teacher_topk(
        flat_hidden, weight.detach(), int(k), float(temperature), float(softcap or 0.0)
    )
    return ids.reshape(*lead_shape, k), logprobs.reshape(*lead_shape, k)


@torch.library.register_fake(f"pdengine::{_OP_NAME}")
def _teacher_topk_fake(hidden, weight, k, temperature, softcap):
    n = hidden.shape[0]
    ids = hidden.new_empty((n, k), dtype=torch.int64)
    logprobs = hidden.new_empty((n, k), dtype=torch.float32)
    return ids, logprobs


def _triton_impl(hidden, weight, k, temperature, softcap):
    from pdengine.kernels.teacher_topk import teacher_topk as launcher  # lazy: triton import

    return launcher(hidden, weight, k, temperature, softcap)


def _reference_impl(hidden, weight, k, temperature, softcap):
    """The materialized reference, cast to the op's contract (float32 log-probs)."""
    ids, logprobs = reference.teacher_topk(hidden, weight, k, temperature, softcap or None)
    return ids.contiguous(), logprobs.to(torch.float32).contiguous()


_library.register_cuda(_OP_NAME, _triton_impl)
_library.register_cpu_fallback(_OP_NAME, _triton_impl, _reference_impl)
