"""Front-end of the fused LoRA linear on an NF4 base (docs/DESIGN.md, "Quantized base"):
`y = x Wq^T (+ bias) + s * (dropout(x) A^T) B^T`, Wq given packed (`quantize.NF4Weight`).

`pdengine::lora_linear_nf4` / `pdengine::lora_linear_nf4_backward` are custom ops whose
schemas are defined here (the packed weight travels as its fields):
- CUDA: the Triton kernels of `kernels/lora_linear_nf4.py`, which dequantize tiles of the
  packed weight in registers inside the extended-K GEMM (no dense weight in memory);
- CPU: bitsandbytes' C dequantization of this one layer (5x faster than the same in
  torch, bench/qlora.py), then the dense `pdengine::lora_linear` kernels; the dense copy
  is freed when the call returns, and the backward dequantizes again rather than keep it.
Same semantics as `pdengine.lora_linear` (dropout mask, frozen base, gradient dtypes).
"""
from __future__ import annotations

import torch

from pdengine.ops._checks import check_float_tensor
from pdengine.ops.lora_linear import draw_seed
from pdengine.quantize import NestedAbsmax, NF4Weight, block_absmax, dequantize_nf4

_WEIGHT_ARGS = ("Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
                "int blocksize, int nested_blocksize, float nested_offset, int d_out, ScalarType w_dtype")
SCHEMAS = {
    "lora_linear_nf4": (f"(Tensor x, {_WEIGHT_ARGS}, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, "
                        "float dropout, int seed) -> Tensor"),
    "lora_linear_nf4_backward": (f"(Tensor grad_out, Tensor x, {_WEIGHT_ARGS}, Tensor lora_a, Tensor lora_b, "
                                 "float scale, float dropout, int seed) -> (Tensor, Tensor, Tensor)"),
}
for _name, _schema in SCHEMAS.items():
    torch.library.define(f"pdengine::{_name}", _schema)

_N_WEIGHT_ARGS = 10


def weight_args(w: NF4Weight) -> tuple:
    """The NF4Weight as the ops' 10 positional weight arguments."""
    nested = w.nested
    return (w.packed, nested.quantized if nested else w.absmax, w.code,
            nested.scale if nested else None, nested.code if nested else None,
            w.blocksize, nested.blocksize if nested else 0, nested.offset if nested else 0.0,
            w.shape[0], w.dtype)


def weight_from_args(args, d_in: int) -> NF4Weight:
    packed, absmax, code, nested_absmax, nested_code, blocksize, nested_blocksize, offset, d_out, w_dtype = args
    nested = None
    if nested_absmax is not None:
        nested = NestedAbsmax(absmax, nested_code, nested_absmax, nested_blocksize, offset)
    return NF4Weight(packed, absmax, code, blocksize, (d_out, d_in), w_dtype, nested)


def _dense(w: NF4Weight, dtype) -> torch.Tensor:
    """This layer's dense weight in `dtype`: bitsandbytes' C kernel when it decodes this
    shape right (rows a whole number of blocks, see quantize.refuse_misdecoded_cpu_shapes),
    else the same values in torch."""
    import sys

    if "bitsandbytes" in sys.modules and w.packed.device.type == "cpu" and w.shape[1] % w.blocksize == 0:
        absmax = block_absmax(w)
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(w.packed, absmax, w.blocksize, "nf4",
                                                               list(w.shape), w.dtype)
        return dense.to(dtype)
    return dequantize_nf4(w, dtype)


# ------------------------------------------------------------------------- kernels


def _cpu_forward(x, *rest):
    w = weight_from_args(rest[:_N_WEIGHT_ARGS], x.shape[1])
    lora_a, lora_b, scale, bias, dropout, seed = rest[_N_WEIGHT_ARGS:]
    return torch.ops.pdengine.lora_linear(x, _dense(w, x.dtype), lora_a, lora_b, scale, bias, dropout, seed)


def _cpu_backward(grad_out, x, *rest):
    w = weight_from_args(rest[:_N_WEIGHT_ARGS], x.shape[1])
    lora_a, lora_b, scale, dropout, seed = rest[_N_WEIGHT_ARGS:]
    return torch.ops.pdengine.lora_linear_backward(grad_out, x, _dense(w, x.dtype), lora_a, lora_b,
                                                   scale, dropout, seed)


def _cuda_forward(*args):
    from pdengine.kernels import lora_linear_nf4 as kernels  # lazy: triton is heavy to import

    return kernels.lora_linear_nf4(*args)


def _cuda_backward(*args):
    from pdengine.kernels import lora_linear_nf4 as kernels

    return kernels.lora_linear_nf4_backward(*args)


torch.library.register_kernel("pdengine::lora_linear_nf4", "cpu", _cpu_forward)
torch.library.register_kernel("pdengine::lora_linear_nf4_backward", "cpu", _cpu_backward)
torch.library.register_kernel("pdengine::lora_linear_nf4", "cuda", _cuda_forward)
torch.library.register_kernel("pdengine::lora_linear_nf4_backward", "cuda", _cuda_backward)


@torch.library.register_fake("pdengine::lora_linear_nf4")
def _forward_fake(x, *rest):
    return x.new_empty((x.shape[0], rest[8]))


@torch.library.register_fake("pdengine::lora_linear_nf4_backward")
def _backward_fake(grad_out, x, *rest):
    lora_a, lora_b = rest[_N_WEIGHT_ARGS], rest[_N_WEIGHT_ARGS + 1]
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


# ------------------------------------------------------------------------ autograd


def _setup_context(ctx, inputs, output):
    x, weight = inputs[0], inputs[1:1 + _N_WEIGHT_ARGS]
    lora_a, lora_b, scale, _bias, dropout, seed = inputs[1 + _N_WEIGHT_ARGS:]
    tensors = [t for t in weight if isinstance(t, torch.Tensor)]
    ctx.weight_layout = [isinstance(t, torch.Tensor) for t in weight]
    ctx.weight_values = [None if isinstance(t, torch.Tensor) else t for t in weight]
    ctx.save_for_backward(x, lora_a, lora_b, *tensors)  # the packed weight, never a dense one
    ctx.scale, ctx.dropout, ctx.seed = scale, dropout, seed


def _backward(ctx, grad_out):
    x, lora_a, lora_b, *tensors = ctx.saved_tensors
    tensors = iter(tensors)
    weight = [next(tensors) if is_tensor else value for is_tensor, value in zip(ctx.weight_layout, ctx.weight_values)]
    grad_x, grad_a, grad_b = torch.ops.pdengine.lora_linear_nf4_backward(
        grad_out.contiguous(), x, *weight, lora_a, lora_b, ctx.scale, ctx.dropout, ctx.seed)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, *([None] * _N_WEIGHT_ARGS),
            grad_a if needs[1 + _N_WEIGHT_ARGS] else None, grad_b if needs[2 + _N_WEIGHT_ARGS] else None,
            None, None, None, None)


torch.library.register_autograd("pdengine::lora_linear_nf4", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- public API


def _check_args(x, weight, lora_a, lora_b, bias, dropout):
    check_float_tensor("x", x, None)
    check_float_tensor("lora_a", lora_a, 2)
    check_float_tensor("lora_b", lora_b, 2)
    if not isinstance(weight, NF4Weight):
        raise ValueError(f"weight must be a pdengine.quantize.NF4Weight, got {type(weight).__name__}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal the weight's d_in ({d_in})")
    r = lora_a.shape[0]
    if tuple(lora_a.shape) != (r, d_in) or tuple(lora_b.shape) != (d_out, r):
        raise ValueError(f"lora_a [r, {d_in}] and lora_b [{d_out}, r] expected, got {tuple(lora_a.shape)} "
                         f"and {tuple(lora_b.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias, 1)
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must have shape [{d_out}], got {tuple(bias.shape)}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def lora_linear_nf4(x, weight: NF4Weight, lora_a, lora_b, scale, bias=None, dropout=0.0, seed=None):
    """`x Wq^T (+ bias) + scale * (dropout(x) A^T) B^T` with Wq the NF4 `weight`.

    Args as `pdengine.lora_linear`, except `weight`: a `quantize.NF4Weight`
    (`quantize.nf4_weight(linear4bit)`). x `[..., d_in]`; returns `[..., d_out]` in x's dtype.
    """
    _check_args(x, weight, lora_a, lora_b, bias, dropout)
    if seed is None:
        seed = draw_seed() if dropout > 0 else 0
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.pdengine.lora_linear_nf4(x2d, *weight_args(weight), lora_a, lora_b, float(scale),
                                           bias, float(dropout), int(seed))
    return y.reshape(*lead, weight.shape[0])
