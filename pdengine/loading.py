"""Loading a local Hugging Face causal LM and its tokenizer, with clear errors.

pdengine never reaches a model hub: paths must be local directories.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def pick_device(device=None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = json.loads(config_file.read_text())
    archs = config.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ValueError(f"{path} holds a {', '.join(archs)}, not a causal LM (*ForCausalLM)")


def load_model_and_tokenizer(path, *, dtype=None, device=None):
    """Load `(model, tokenizer)` from a local directory, in eval mode, on `device`.

    dtype defaults to bfloat16 on CUDA and float32 on CPU. Raises ValueError when the
    directory is missing, is not a model directory, or does not hold a causal LM.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _check_model_dir(path)
    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot load a causal LM from {path}: {e}") from None
    return model.to(device).eval(), tokenizer
