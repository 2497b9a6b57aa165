"""pdengine: knowledge injection via prompt distillation, with fused kernels.

Importing pdengine registers the ops (`torch.ops.pdengine.*`); the heavier parts
(transformers-based LoRA, prefill, training, evaluation) load on first use.

The public names are loaded lazily from `_EXPORTS`; the `TYPE_CHECKING` block imports the
same names eagerly for type checkers and IDEs only, and `__dir__` lists them, so
`dir(pdengine)` and completion see everything (tests/test_public_api.py keeps the three
in agreement).
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

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
    "PromptFormat": "pdengine.prompts",
    "TrainConfig": "pdengine.train",
    "TrainingError": "pdengine.train",
    "InputError": "pdengine.errors",
}
# The pipeline stages are submodules: pdengine.prefill.prefill(...), pdengine.train.train(...),
# pdengine.evaluate.evaluate(...), pdengine.qa.generate_questions(...). (Exporting those
# functions under the modules' own names would make `pdengine.train` mean the function or
# the module depending on import order.)
_SUBMODULES = ("cache", "cli", "demo", "evaluate", "lora", "prefill", "qa", "train")

__all__ = ["backend_info", *_EXPORTS]

if TYPE_CHECKING:  # the same names as _EXPORTS and _SUBMODULES, for type checkers and IDEs
    from pdengine import cache, cli, demo, evaluate, lora, prefill, qa, train
    from pdengine.cache import TeacherCache
    from pdengine.errors import InputError
    from pdengine.lora import add_lora, disable_adapters, lm_head_lora, load_adapter, merge_adapter, save_adapter
    from pdengine.ops.linear_topk_kl import LinearTopKKL, linear_topk_kl
    from pdengine.ops.lora_linear import lora_linear
    from pdengine.ops.teacher_topk import teacher_topk
    from pdengine.prompts import PromptFormat
    from pdengine.train import TrainConfig, TrainingError


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return import_module(f"pdengine.{name}")
    raise AttributeError(f"module 'pdengine' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
