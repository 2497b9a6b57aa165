"""The `torch.ops.pdengine` library: schemas, the C++ extension, backend choice.

Each op is a `torch.library` custom op whose schema is defined here, once (SCHEMAS). The
C++ extension only registers CPU implementations on those names
(`TORCH_LIBRARY_IMPL(pdengine, CPU, m)` in csrc/ops.cpp); the dispatcher checks each C++
kernel's signature against the schema, whichever of the two is loaded first. CUDA kernels
(Triton), fake (meta) kernels and autograd are registered from Python by each op's
front-end in `pdengine/ops/<op>.py`.

Backends:
- CUDA tensors: Triton kernels (`pdengine.kernels`).
- CPU tensors: the C++ extension `pdengine._C`. When it is not built, the CPU kernel is
  the Triton interpreter if TRITON_INTERPRET=1 is set, else the plain-torch reference
  (which materializes [N, V] logits); the first call warns once, naming it.
"""
from __future__ import annotations

import os
import warnings

import torch

from pdengine.ops._checks import RAW_CHECKS

SCHEMAS = {
    "linear_topk_kl": (
        "linear_topk_kl(Tensor hidden, Tensor weight, Tensor? lora_a, Tensor? lora_b, "
        "Tensor teacher_ids, Tensor teacher_logprobs, Tensor? labels, float lora_scale, "
        "float temperature, float softcap, bool tail, float ce_weight, int ignore_index) "
        "-> (Tensor, Tensor)"
    ),
    "linear_topk_kl_backward": (
        "linear_topk_kl_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? lora_a, "
        "Tensor? lora_b, Tensor teacher_ids, Tensor teacher_logprobs, Tensor? labels, Tensor lse, "
        "float lora_scale, float temperature, float softcap, bool tail, float ce_weight, "
        "int ignore_index, bool needs_weight_grad) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "linear_topk_kl_forward_backward": (
        "linear_topk_kl_forward_backward(Tensor grad_loss, Tensor hidden, Tensor weight, "
        "Tensor? lora_a, Tensor? lora_b, Tensor teacher_ids, Tensor teacher_logprobs, "
        "Tensor? labels, float lora_scale, float temperature, float softcap, bool tail, "
        "float ce_weight, int ignore_index, bool needs_weight_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "lora_linear": (
        "lora_linear(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
        "Tensor? bias, float dropout, SymInt seed) -> Tensor"
    ),
    "lora_linear_backward": (
        "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, "
        "Tensor lora_b, float scale, float dropout, SymInt seed) -> (Tensor, Tensor, Tensor)"
    ),
    "teacher_topk": (
        "teacher_topk(Tensor hidden, Tensor weight, int k, float temperature, float softcap) "
        "-> (Tensor, Tensor)"
    ),
}


# Defined before the extension is imported; an extension loaded earlier (e.g. by
# torch.ops.load_library) has left kernels waiting on these names, which is fine too.
for _name, _schema in SCHEMAS.items():
    torch.library.define(f"pdengine::{_name}", _schema[len(_name) :])


def _load_cpp_extension():
    if os.environ.get("PDENGINE_NO_CPP") == "1":
        return None
    try:
        from pdengine import _C  # noqa: F401  (importing registers the ops)

        return _C
    except ImportError:
        return None


_C = _load_cpp_extension()
HAS_CPP = _C is not None


def cpu_fallback_backend() -> str:
    """What CPU tensors run when the C++ extension is missing."""
    return "triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch-reference"


def backend_info() -> dict:
    """Which implementation each device runs, for logs and bug reports."""
    return {
        "cuda": "triton",
        "cpu": "cpp" if HAS_CPP else cpu_fallback_backend(),
    }


_warned = False


def warn_cpu_fallback_once():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "pdengine: the C++ extension pdengine._C is not built; CPU ops run the "
            f"{cpu_fallback_backend()} backend instead (slow"
            + (", materializes [N, V] logits" if cpu_fallback_backend() == "torch-reference" else "")
            + "). Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def checked(name: str, impl):
    """impl behind the raw op's argument checks (the C++ kernels' own, mirrored in
    pdengine/ops/_checks.py): every backend of an op refuses the same calls alike."""
    check = RAW_CHECKS[name]

    def checked_impl(*args):
        check(*args)
        return impl(*args)

    checked_impl.__name__ = f"{name}_{getattr(impl, '__name__', 'impl')}"
    return checked_impl


def register_cpu_fallback(name: str, triton_impl, reference_impl):
    """Register the CPU kernel for `pdengine::name` when the C++ extension is missing."""
    if HAS_CPP:
        return

    def cpu_impl(*args):
        warn_cpu_fallback_once()
        if cpu_fallback_backend() == "triton-interpreter":
            return triton_impl(*args)
        return reference_impl(*args)

    torch.library.register_kernel(f"pdengine::{name}", "cpu", checked(name, cpu_impl))


def register_cuda(name: str, triton_impl):
    torch.library.register_kernel(f"pdengine::{name}", "cuda", checked(name, triton_impl))
