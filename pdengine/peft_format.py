"""LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight`, `.lora_embedding_A`, ... as PEFT writes
them. PEFT's older pickled `adapter_model.bin` is read through `torch.load(weights_only=True)`
only (a pickle can run code). Every problem with the files is an InputError of one line
naming the file: a missing or truncated file, a refused pickle, an unsupported PEFT feature,
keys that do not fit the model. `pdengine.lora.save_adapter` / `load_adapter` use this module.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch

from pdengine.errors import InputError
from pdengine.io import atomic_write_bytes, atomic_write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors: a pickle of tensors
KEY_PREFIX = "base_model.model."


def adapter_config(cfg: dict, base_name) -> dict:
    """adapter_config.json of a LoRA made by pdengine.lora.add_lora (its `pdengine_lora_config`)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name or None,
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"],
        "use_rslora": cfg["use_rslora"],
        "target_modules": cfg["target_modules"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
        "auto_mapping": None,
    }


def write_adapter(path, config: dict, tensors: dict) -> Path:
    """Write an adapter directory (each file atomically); returns its path."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_NAME, config)
    return path


# Adapter features pdengine does not implement: refuse rather than load something else.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "exclude_modules": (None, [], ""),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}),
}


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise InputError(f"adapter path {path} is not a directory")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise InputError(f"adapter path {path} has no {CONFIG_NAME} (is it a PEFT LoRA adapter directory?)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{file}: must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise InputError(f"{file}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    _check_hyperparameters(config, file)
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise InputError(f"{file}: {key}={config[key]!r} is not supported by pdengine")
    return config


def _check_hyperparameters(config: dict, file: Path) -> None:
    checks = {
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int"),
        "lora_alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       and v > 0, "a positive number"),
        "target_modules": (lambda v: isinstance(v, str) or (isinstance(v, list) and v
                                                             and all(isinstance(t, str) for t in v)),
                           "a module name pattern or a non-empty list of names"),
    }
    for key, (check, expected) in checks.items():
        if key not in config:
            raise InputError(f"{file}: missing {key!r}")
        if not check(config[key]):
            raise InputError(f"{file}: {key} must be {expected}, got {config[key]!r}")
    dropout = config.get("lora_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise InputError(f"{file}: lora_dropout must be a number in [0, 1), got {dropout!r}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors from adapter_model.safetensors (or PEFT's older pickled
    adapter_model.bin, through the weights-only unpickler: a pickle can run code)."""
    file = path / WEIGHTS_NAME
    if file.is_file():
        return _read_safetensors(file)
    legacy = path / LEGACY_WEIGHTS_NAME
    if not legacy.is_file():
        raise InputError(f"adapter path {path} has no {WEIGHTS_NAME} (nor PEFT's older {LEGACY_WEIGHTS_NAME})")
    try:
        tensors = torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{legacy}: refused by torch.load(weights_only=True): it is not a pickle of plain tensors "
                         f"(a pickle can run code); convert the adapter to {WEIGHTS_NAME} from a source you "
                         "trust") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InputError(f"{legacy}: not a readable torch file, truncated? ({_first_line(e)})") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise InputError(f"{legacy}: holds a {type(tensors).__name__}, not a dict of named tensors")
    return tensors


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: not a readable safetensors file, truncated? ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def check_keys(path: Path, expected: dict, found: dict) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"adapter {path} does not fit this model ({len(missing)} missing keys, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}): "
            "is it for another architecture?"
        )
    for key, tensor in found.items():
        target = expected[key]
        if tuple(target.shape) != tuple(tensor.shape):
            raise InputError(
                f"adapter {path}: {key} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
