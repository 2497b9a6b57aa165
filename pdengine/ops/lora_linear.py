"""Front-end of the fused LoRA linear op: `y = x W^T (+ bias) + s * (dropout(x) A^T) B^T`.

`pdengine::lora_linear` / `pdengine::lora_linear_backward` are custom ops (schemas in
`_library.SCHEMAS`): CUDA runs the Triton kernels of `kernels/lora_linear.py`, CPU runs
the C++ kernels of `csrc/` (or, when those are not built, the fallback `_library` picks).
This module adds the fake kernels, the autograd formula and the public function.

W and bias are frozen (LoRA fine-tuning): the backward returns gradients for x, A and B
only, and asking for a gradient of W or bias is an error rather than a silent zero.
"""
from __future__ import annotations

import random

import torch

from pdengine import reference
from pdengine.ops import _library
from pdengine.ops._checks import check_float_tensor, check_input_and_weight

# Dropout seeds are drawn below 2**31 so they fit every backend's int type.
_SEED_BOUND = 2**31 - 1


# ---------------------------------------------------------------------------- checks


def _check_args(x, weight, lora_a, lora_b, scale, bias, dropout):
    """ValueError naming the argument for every malformed input (x may be N-D here)."""
    check_input_and_weight("x", x, weight, "the input features")
    check_float_tensor("lora_a", lora_a, 2)
    check_float_tensor("lora_b", lora_b, 2)
    d_out, d_in = weight.shape
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError("lora_a must have at least one row (rank >= 1)")
    if lora_a.shape[1] != d_in:
        raise ValueError(f"lora_a must have shape [r, {d_in}], got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (d_out, r):
        raise ValueError(f"lora_b must have shape [{d_out}, {r}], got {tuple(lora_b.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias, 1)
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must have shape [{d_out}], got {tuple(bias.shape)}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number, got {type(scale).__name__}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} must be frozen (requires_grad=False): lora_linear trains only "
                    "x, lora_a and lora_b"
                )


# ---------------------------------------------------------------- CPU fallback kernels


def _reference_forward(x, weight, lora_a, lora_b, scale, bias, dropout, seed):
    return reference.lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout, seed)


def _reference_backward(grad_out, x, weight, lora_a, lora_b, scale, dropout, seed):
    """Gradients of the reference by autograd (the specification, not a fast path)."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        ar = lora_a.detach().requires_grad_(True)
        br = lora_b.detach().requires_grad_(True)
        y = reference.lora_linear(xr, weight.detach(), ar, br, scale, None, dropout, seed)
        gx, ga, gb = torch.autograd.grad(y, (xr, ar, br), grad_out.to(y.dtype))
    return gx.to(x.dtype), ga.to(lora_a.dtype), gb.to(lora_b.dtype)


def _interpreter_lacks(x) -> bool:
    """The Triton CPU interpreter has no bf16 tl.dot: such calls run the reference."""
    return not x.is_cuda and x.dtype == torch.bfloat16


def _triton_forward(*args):
    if _interpreter_lacks(args[0]):
        return _reference_forward(*args)
    from pdengine.kernels import lora_linear as kernels  # lazy: triton is heavy to import

    return kernels.lora_linear(*args)


def _triton_backward(*args):
    if _interpreter_lacks(args[1]):
        return _reference_backward(*args)
    from pdengine.kernels import lora_linear as kernels

    return kernels.lora_linear_backward(*args)


_library.register_cuda("lora_linear", _triton_forward)
_library.register_cuda("lora_linear_backward", _triton_backward)
_library.register_cpu_fallback("lora_linear", _triton_forward, _reference_forward)
_library.register_cpu_fallback("lora_linear_backward", _triton_backward, _reference_backward)


# ------------------------------------------------------------------------ fake kernels


@torch.library.register_fake("pdengine::lora_linear")
def _lora_linear_fake(x, weight, lora_a, lora_b, scale, bias, dropout, seed):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("pdengine::lora_linear_backward")
def _lora_linear_backward_fake(grad_out, x, weight, lora_a, lora_b, scale, dropout, seed):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


# ---------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, scale, bias, dropout, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.scale, ctx.dropout, ctx.seed = scale, dropout, seed


def _backward(ctx, grad_out):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    grad_x, grad_a, grad_b = torch.ops.pdengine.lora_linear_backward(
        grad_out.contiguous(), x, weight, lora_a, lora_b, ctx.scale, ctx.dropout, ctx.seed
    )
    needs = ctx.needs_input_grad
    return (
        grad_x if needs[0] else None,
        None,  # weight: frozen
        grad_a if needs[2] else None,
        grad_b if needs[3] else None,
        None,
        None,  # bias: frozen
        None,
        None,
    )


torch.library.register_autograd("pdengine::lora_linear", _backward, setup_context=_setup_context)


# -------------------------------------------------------------------------- public API


def draw_seed() -> int:
    """A dropout seed from torch's (CPU) default generator: reproducible under
    torch.manual_seed and free of device syncs.

    Under torch.compile, `.item()` would break the graph (fullgraph=True fails); Python's
    `random` is what Dynamo replays with a fresh value at every call, as a SymInt, which the
    op's `SymInt seed` accepts (reproducible under `random.seed`)."""
    if torch.compiler.is_compiling():
        return random.randint(0, _SEED_BOUND - 1)
    return int(torch.randint(0, _SEED_BOUND, (1,)).item())


def lora_linear(x, weight, lora_a, lora_b, scale, bias=None, dropout=0.0, seed=None):
    """Fused LoRA linear: `x W^T (+ bias) + scale * (dropout(x) A^T) B^T`.

    Args:
        x: `[..., d_in]` input; leading dimensions are flattened for the op and restored.
        weight: `[d_out, d_in]` frozen base weight.
        lora_a: `[r, d_in]`, lora_b: `[d_out, r]` trainable LoRA factors (any float dtype;
            their gradients come back in their own dtype).
        scale: the LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA).
        bias: optional frozen `[d_out]` bias.
        dropout: LoRA dropout probability on the LoRA path's input (PEFT's
            `B(A(dropout(x)))`); pass 0.0 at evaluation time.
        seed: dropout seed; the keep-mask is `reference.dropout_keep_mask(x2d.shape,
            dropout, seed)`, recomputed in the backward (never stored). None draws one
            from torch's generator.

    Returns: `[..., d_out]` in x's dtype.
    """
    _check_args(x, weight, lora_a, lora_b, scale, bias, dropout)
    if seed is None:
        seed = draw_seed() if dropout > 0 else 0
    elif not isinstance(seed, (int, torch.SymInt)):
        raise ValueError(f"seed must be an int or None, got {type(seed).__name__}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.ops.pdengine.lora_linear(
        x2d, weight, lora_a, lora_b, float(scale), bias, float(dropout),
        seed if isinstance(seed, torch.SymInt) else int(seed)
    )
    return y.reshape(*lead, weight.shape[0])
