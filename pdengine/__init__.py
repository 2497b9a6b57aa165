"""pdengine: knowledge injection via prompt distillation, with fused kernels.

Importing pdengine registers the ops (`torch.ops.pdengine.*`); the heavier parts
(transformers-based LoRA, prefill, training, evaluation) load on first use.
"""
from importlib import import_module

from pdengine import ops as _ops  # noqa: F401  (registers torch.ops.pdengine.*)
from pdengine.ops._library import backend_info

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily)
_EXPORTS = {
    "linear_topk_kl": "pdengine.ops.linear_topk_kl",
    "LinearTopKKL": "pdengine.ops.linear_topk_kl",
    "lora_linear": "pdengine.ops.lora_linear",
    "teacher_topk": "pdengine.ops.teacher_topk",
    "add_lora": "pdengine.lora",
    "save_adapter": "pdengine.lora",
    "load_adapter": "pdengine.lora",
    "merge_adapter": "pdengine.lora",
    "disable_adapters": "pdengine.lora",
    "lm_head_lora": "pdengine.lora",
    "TeacherCache": "pdengine.cache",
    "TrainConfig": "pdengine.train",
}
# The pipeline stages are submodules: pdengine.prefill.prefill(...), pdengine.train.train(...),
# pdengine.evaluate.evaluate(...), pdengine.qa.generate_questions(...). (Exporting those
# functions under the modules' own names would make `pdengine.train` mean the function or
# the module depending on import order.)

__all__ = ["backend_info", *_EXPORTS]


_SUBMODULES = {"cache", "cli", "demo", "evaluate", "lora", "prefill", "qa", "train"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return import_module(f"pdengine.{name}")
    raise AttributeError(f"module 'pdengine' has no attribute {name!r}")
