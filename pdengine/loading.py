"""Loading a local Hugging Face causal LM and its tokenizer, with clear errors.

pdengine never reaches a model hub: paths must be local directories.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from pdengine.errors import InputError


def pick_device(device=None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise InputError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{config_file}: not a valid JSON config ({e})") from None
    archs = (config.get("architectures") or []) if isinstance(config, dict) else None
    if archs is None:
        raise InputError(f"{config_file}: expected a JSON object")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise InputError(f"{path} holds a {', '.join(archs)}, not a causal LM (*ForCausalLM)")


def load_model_and_tokenizer(path, *, dtype=None, device=None):
    """Load `(model, tokenizer)` from a local directory, in eval mode, on `device`.

    dtype defaults to bfloat16 on CUDA and float32 on CPU. Raises InputError when the
    directory is missing, is not a model directory, does not hold a causal LM, or holds
    pickled weights (`pytorch_model.bin`) that torch's `weights_only` loader refuses: a
    pickle can run code, so it is never loaded unsafely.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _check_model_dir(path)
    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: the pickled weights (pytorch_model.bin) hold objects that are not plain "
                         f"tensors, refused by torch.load(weights_only=True); convert the model to "
                         f"safetensors from a source you trust") from None
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise InputError(f"{path}: unreadable safetensors weights ({_first_line(e)}); "
                         f"the file is truncated or corrupt") from None
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"cannot load a causal LM from {path}: {_first_line(e)}") from None
    return model.to(device).eval(), tokenizer


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_tokenizer_and_config(path):
    """`(tokenizer, config)` of a local model directory without its weights: what a
    pre-flight check (context length, vocabulary) needs before any stage loads the model."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    _check_model_dir(path)
    try:
        return (AutoTokenizer.from_pretrained(path, local_files_only=True),
                AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer and config of {path}: {_first_line(e)}") from None
