"""Op front-ends: custom ops, autograd, fake kernels, CUDA->Triton / CPU->C++ dispatch.

Importing this package registers every op under `torch.ops.pdengine`.
"""
from importlib import import_module

from pdengine.ops._library import HAS_CPP, SCHEMAS, backend_info  # noqa: F401

# Each front-end registers its op when imported; a front-end not written yet is skipped.
for _name in ("linear_topk_kl", "lora_linear", "teacher_topk"):
    try:
        import_module(f"pdengine.ops.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"pdengine.ops.{_name}":
            raise
