"""Settings known not to inject knowledge, said before the run spends its time (issue 15).

Measured on the demo's ~1 M-parameter model: the paper's 8B settings (lr 1e-5, no
embedding LoRA) leave the student at the base model's accuracy (4.6 % vs 4.4 %), while
examples/demo.yaml (lr 3e-3, LoRA on the input embeddings, replay) injects. Small models
need the larger step and the embedding adapter; the line says so and points at the recipe.
"""
from __future__ import annotations

from pdengine.training.config import TrainConfig

SMALL_MODEL_PARAMETERS = 100_000_000
PAPER_SIZED_LR = 1e-4  # at or below this, a small model barely moves in the paper's 10 epochs


def base_parameters(model) -> int:
    """Parameters of the model without any LoRA adapter."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def small_model_warning(model, config: TrainConfig) -> str | None:
    """One warning line when `config` is known not to inject on a model this small, else None."""
    n = base_parameters(model)
    if n >= SMALL_MODEL_PARAMETERS or config.lora_embeddings or config.lr > PAPER_SIZED_LR:
        return None
    return (f"warning: lr {config.lr:g} without embedding LoRA is known not to inject knowledge into a model "
            f"this small ({n / 1e6:.1f} M parameters; the demo's model stays at the base's accuracy): see "
            "examples/demo.yaml (lr 3e-3, --lora-embeddings, replay)")
