"""The student model for a run: pdengine LoRA adapters added (or kept), all else frozen."""
from __future__ import annotations

import torch

from pdengine.errors import InputError
from pdengine.training.batching import mix_seed
from pdengine.training.config import TrainConfig

PEFT_HOWTO = ("train() takes a model with pdengine LoRA adapters, not a peft.PeftModel: save the PEFT "
              "adapter (peft_model.save_pretrained(DIR)) and load it onto the base model with "
              "pdengine.load_adapter(peft_model.unload(), DIR), or pass peft_model.unload() to start "
              "new adapters from the config")


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # without peft installed, no model can be one
        return False
    return isinstance(model, PeftModel)


def _has_lora(model) -> bool:
    # By parameter name, like the freezing below: any LoRA layer kind (plain, on a
    # quantized base, ...) counts, and its parameters are the ones trained.
    return any("lora_" in name for name, _ in model.named_parameters())


def prepare_model(model, config: TrainConfig) -> dict:
    """Add LoRA (when the model has none), freeze everything else; the trainable params."""
    if _is_peft_model(model):
        raise InputError(PEFT_HOWTO)
    if config.init_adapter:
        _load_initial_adapter(model, config.init_adapter)
    if not _has_lora(model):
        from pdengine.lora import add_lora

        torch.manual_seed(mix_seed(config.seed, 0x10A))  # LoRA init depends on the seed only
        targets = list(config.lora_targets) + (["embed_tokens"] if config.lora_embeddings else [])
        try:
            add_lora(model, config.lora_r, config.lora_alpha, dropout=config.lora_dropout,
                     target_modules=targets, lm_head=config.lora_lm_head, rslora=config.rslora)
        except ValueError as e:  # add_lora checks its arguments (targets that match nothing, ...)
            raise InputError(f"lora settings: {e}") from None
    named = {}
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if p.requires_grad:
            named[name] = p
    if not named:
        raise InputError("the model has no LoRA parameters to train")
    if config.grad_checkpointing:
        _enable_checkpointing(model)
    return named


def _load_initial_adapter(model, path) -> None:
    """Continue from a saved PEFT adapter: its layers (rank, alpha, targets) become the ones
    trained, so the lora_* settings do not apply."""
    from pathlib import Path

    from pdengine.lora import load_adapter

    if _has_lora(model):
        raise InputError(f"init_adapter {path}: the model already has LoRA adapters; pass the base model")
    if not Path(path).is_dir():
        raise InputError(f"init_adapter {path} is not a directory (a PEFT adapter: adapter_config.json + "
                         "adapter_model.safetensors)")
    load_adapter(model, path)


def _enable_checkpointing(model) -> None:
    """Activation checkpointing of the decoder layers (non-reentrant: LoRA-only grads work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
