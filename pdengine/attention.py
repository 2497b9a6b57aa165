"""Which attention implementation a model runs with (`--attn-implementation`).

pdengine never builds a `[T, T]` mask for training: packed rows reach the model with
restarted `position_ids`, no attention mask and `use_cache=False`, and the model's own
implementation separates the sequences (flash-attention varlen, FlexAttention block masks,
or sdpa with the mask transformers derives from the positions). With a KV cache transformers
does NOT separate them (the sequences silently see each other), hence `use_cache=False`
everywhere in training. Prefill takes the prefix-KV path (pdengine/prefix_kv.py).
See docs/DESIGN.md, "Attention paths".
"""
from __future__ import annotations

import importlib.util

import torch

from pdengine.errors import InputError

CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def available(device: torch.device | str, *, training: bool = True) -> list[str]:
    """The implementations that work on `device` (with a backward pass when `training`)."""
    device = torch.device(device)
    names = ["sdpa", "eager"]
    if device.type == "cuda":
        names.append("flex_attention")
        if _flash_attn_installed():
            names.append("flash_attention_2")
    # Not on the CPU: torch 2.13's CPU FlexAttention has no backward, and its forward aborted
    # the process in prefill (heap corruption) and failed to compile in generation (measured).
    return names


def choose(requested: str | None, device: torch.device | str, *, training: bool = True) -> str:
    """The implementation to load the model with; `auto` (or None) picks the best available:
    flash-attention 2 on CUDA when installed, else sdpa. An unavailable request is an InputError."""
    requested = requested or "auto"
    if requested not in CHOICES:
        raise InputError(f"attn_implementation must be one of {', '.join(CHOICES)}; got {requested!r}")
    names = available(device, training=training)
    if requested == "auto":
        return "flash_attention_2" if "flash_attention_2" in names else "sdpa"
    if requested not in names:
        why = "flash-attn is not installed" if requested == "flash_attention_2" else \
            f"it is not available on {torch.device(device).type}"
        raise InputError(f"attention implementation {requested!r} cannot be used: {why}; "
                         f"available here: {', '.join(names)}")
    return requested
