"""Op front-ends: custom ops, autograd, fake kernels, CUDA->Triton / CPU->C++ dispatch.

Importing this package registers every op under `torch.ops.pdengine`.
"""
from pdengine.ops import linear_topk_kl, lora_linear, teacher_topk  # noqa: F401  (register the ops)
from pdengine.ops._library import HAS_CPP, SCHEMAS, backend_info  # noqa: F401
