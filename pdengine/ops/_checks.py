"""Host-side argument checks shared by the op front-ends: a ValueError that names the
argument, raised before anything reaches a kernel."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name, t, ndim=None):
    """t is a floating tensor (fp16/bf16/fp32/fp64), with `ndim` dimensions when given."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_input_and_weight(name, x, weight, what):
    """x [..., d] (N-D) and a 2-D weight [out, d] of x's dtype; `what` says what d is."""
    check_float_tensor(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension ({what})")
    check_float_tensor("weight", weight, 2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}'s last dimension ({x.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]})")
    if x.dtype != weight.dtype:
        raise ValueError(f"{name} ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")


def check_number(name, value, *, positive=False, nonnegative=False):
    """value is a finite Python int or float (not a bool), > 0 or >= 0 when asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a Python number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# ------------------------------------------------------------------ the raw ops' boundary
# The raw ops (`torch.ops.pdengine.*`, schema arguments, 2-D tensors) check their arguments
# once, at the dispatcher boundary, on every backend: the C++ kernels in csrc/ (check_inputs
# and friends) and, for the Triton / fallback kernels, the functions below, which check the
# same things with the same messages (tests/test_op_boundary.py runs one list of bad calls
# against both). The kernel launchers in kernels/ check nothing. One difference: ids and
# labels are range-checked against V here only when they are on the CPU (as C++ does);
# on CUDA that read would be a host sync in every training step, so it is the front-end's
# `validate=True` check (one fused device reduction) that covers it there.


def _raw_floating(name, t):
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def _raw_integral(name, t):
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor, got {t.dtype}")


def _raw_dim(name, t, dim, what):
    if t.dim() != dim:
        raise ValueError(f"{name} must be {what}, got shape {list(t.shape)}")


def _same_device(anchor_name, anchor, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != anchor.device:
            raise ValueError(f"{name} is on {t.device} but {anchor_name} is on {anchor.device}")


def _raw_input_and_weight(name, x, weight, d, out):
    """x [N, d] and a weight [out, d] on x's device; `d` and `out` name the sizes in the
    messages (csrc/common.h check_hidden_and_head, csrc/lora_linear.cpp check_lora_args)."""
    _raw_floating(name, x)
    _raw_dim(name, x, 2, f"2-D [N, {d}]")
    _raw_floating("weight", weight)
    _raw_dim("weight", weight, 2, f"2-D [{out}, {d}]")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape [{out}, {x.shape[1]}] ({name}'s {d}), got {list(weight.shape)}")
    _same_device(name, x, weight=weight)


def raw_hidden_and_head(hidden, weight):
    """hidden [N, d] and an lm_head weight [V, d]."""
    _raw_input_and_weight("hidden", hidden, weight, "d", "V")


def raw_linear_topk_kl(hidden, weight, lora_a, lora_b, ids, lp, labels, lora_scale, temperature,
                       softcap, tail, ce_weight, ignore_index):
    """The forward op's arguments (csrc/linear_topk_kl.cpp check_inputs, check_index_ranges)."""
    raw_hidden_and_head(hidden, weight)
    n, d = hidden.shape
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is not None:
        _raw_floating("lora_a", lora_a)
        _raw_floating("lora_b", lora_b)
        _raw_dim("lora_a", lora_a, 2, "2-D [r, d]")
        if lora_a.shape[1] != d or lora_a.shape[0] < 1:
            raise ValueError(f"lora_a must have shape [r, {d}], got {list(lora_a.shape)}")
        if lora_b.dim() != 2 or tuple(lora_b.shape) != (vocab, lora_a.shape[0]):
            raise ValueError(f"lora_b must have shape [{vocab}, {lora_a.shape[0]}], got {list(lora_b.shape)}")
    _raw_integral("teacher_ids", ids)
    _raw_dim("teacher_ids", ids, 2, "2-D [N, k]")
    if ids.shape[0] != n or ids.shape[1] < 1:
        raise ValueError(f"teacher_ids must have shape [N={n}, k >= 1], got {list(ids.shape)}")
    _raw_floating("teacher_logprobs", lp)
    if lp.shape != ids.shape:
        raise ValueError(f"teacher_logprobs must have the shape of teacher_ids {list(ids.shape)}, got {list(lp.shape)}")
    if labels is not None:
        _raw_integral("labels", labels)
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape [N={n}], got {list(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0 = none), got {softcap}")
    _same_device("hidden", hidden, lora_a=lora_a, lora_b=lora_b, teacher_ids=ids,
                 teacher_logprobs=lp, labels=labels)
    if hidden.device.type == "cpu":
        _raw_index_ranges(ids, labels if ce_weight != 0 else None, vocab, ignore_index)


def _raw_index_ranges(ids, labels, vocab, ignore_index):
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise ValueError(f"teacher_ids must lie in [0, V={vocab}), got {int(bad[0])}")
    if labels is not None:
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
        if bad.numel():
            raise ValueError(f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}, "
                             f"got {int(bad[0])}")


def raw_grad_loss(grad_loss, n):
    _raw_floating("grad_loss", grad_loss)
    if grad_loss.numel() != n:
        raise ValueError(f"grad_loss must have N={n} elements, got shape {list(grad_loss.shape)}")


def raw_linear_topk_kl_backward(grad_loss, *args):
    inputs, lse, hyper = args[:7], args[7], args[8:-1]
    raw_linear_topk_kl(*inputs, *hyper)
    raw_grad_loss(grad_loss, inputs[0].shape[0])
    _raw_floating("lse", lse)
    if lse.numel() != inputs[0].shape[0]:
        raise ValueError(f"lse must have N={inputs[0].shape[0]} elements, got shape {list(lse.shape)}")


def raw_linear_topk_kl_forward_backward(grad_loss, *args):
    raw_linear_topk_kl(*args[:-1])
    raw_grad_loss(grad_loss, args[0].shape[0])


def _raw_lora(x, weight, lora_a, lora_b, dropout):
    """csrc/lora_linear.cpp check_lora_args."""
    _raw_input_and_weight("x", x, weight, "d_in", "d_out")
    _raw_floating("lora_a", lora_a)
    _raw_dim("lora_a", lora_a, 2, "2-D [r, d_in]")
    if lora_a.shape[1] != x.shape[1]:
        raise ValueError(f"lora_a must have shape [r, {x.shape[1]}], got {list(lora_a.shape)}")
    _raw_floating("lora_b", lora_b)
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (weight.shape[0], lora_a.shape[0]):
        raise ValueError(f"lora_b must have shape [{weight.shape[0]}, {lora_a.shape[0]}], got {list(lora_b.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    _same_device("x", x, lora_a=lora_a, lora_b=lora_b)


def raw_lora_linear(x, weight, lora_a, lora_b, scale, bias, dropout, seed):
    _raw_lora(x, weight, lora_a, lora_b, dropout)
    if bias is not None:
        _raw_floating("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
        _same_device("x", x, bias=bias)


def raw_lora_linear_backward(grad_out, x, weight, lora_a, lora_b, scale, dropout, seed):
    _raw_lora(x, weight, lora_a, lora_b, dropout)
    _raw_floating("grad_out", grad_out)
    if grad_out.dim() != 2 or tuple(grad_out.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"grad_out must have shape [{x.shape[0]}, {weight.shape[0]}], got {list(grad_out.shape)}")


def raw_teacher_topk(hidden, weight, k, temperature, softcap):
    """csrc/teacher_topk.cpp."""
    raw_hidden_and_head(hidden, weight)
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must be in [1, V={weight.shape[0]}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0 = none), got {softcap}")


RAW_CHECKS = {
    "linear_topk_kl": raw_linear_topk_kl,
    "linear_topk_kl_backward": raw_linear_topk_kl_backward,
    "linear_topk_kl_forward_backward": raw_linear_topk_kl_forward_backward,
    "lora_linear": raw_lora_linear,
    "lora_linear_backward": raw_lora_linear_backward,
    "teacher_topk": raw_teacher_topk,
}
