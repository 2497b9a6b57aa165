"""Using pdengine's distillation loss inside other trainers.

Hugging Face `Trainer`::

    from transformers import TrainingArguments
    import pdengine
    from pdengine.integrations import CacheDataset, DistillationTrainer, collate_cache_items
    from pdengine.train import TrainConfig

    cfg = TrainConfig(loss="pd", temperature=2.0)          # the cache's temperature
    pdengine.add_lora(model, 16, 32)                        # or load_adapter(model, path)
    trainer = DistillationTrainer(
        model=model,
        args=TrainingArguments("out", per_device_train_batch_size=8, learning_rate=1e-4),
        train_dataset=CacheDataset(pdengine.TeacherCache("cache")),
        data_collator=collate_cache_items,                  # packs sequences, no padding
        distill_config=cfg,
    )
    trainer.train()

Each Trainer batch is packed end to end (`pdengine.train.pack_examples`); the loss is
`pdengine.train.compute_loss` (body-only forward, fused top-k KL on the answer
positions). On a model with pdengine LoRA adapters (`add_lora`, `load_adapter`),
checkpoints and `save_model` write the adapter in PEFT's format (`save_adapter`), not
the full model. `TrainConfig` supplies the loss settings (loss, temperature, mode,
ce_weight); the optimizer, schedule and batch size are the Trainer's.
`loss="online_kl"` needs the cache items' teacher sequences: the collator keeps them.

A plain PyTorch loop: see the `pdengine.train` module docstring.
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer

from pdengine.training.batching import pack_examples, pack_teacher
from pdengine.training.config import TrainConfig
from pdengine.training.losses import compute_loss

TRAINING_ARGS_NAME = "training_args.bin"  # what transformers.Trainer calls it


class CacheDataset(torch.utils.data.Dataset):
    """The items of a TeacherCache (or any list of cache items) as a torch Dataset."""

    def __init__(self, cache):
        if len(cache) == 0:
            from pdengine.errors import InputError

            raise InputError("cache is empty: it holds no examples")
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return self.cache[i]


def collate_cache_items(items) -> dict:
    """Data collator: cache items -> one packed student batch (+ the packed teacher
    sequences, used by loss="online_kl" only)."""
    batch = pack_examples(items)
    if all("teacher_input_ids" in item for item in items):
        batch["teacher"] = pack_teacher(items)
    return batch


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` whose loss is pdengine's (`pdengine.train.compute_loss`).

    Extra keyword argument: `distill_config` (a `TrainConfig`; default `TrainConfig()`).
    The batches from `collate_cache_items` are not model inputs, so unused-column removal
    is switched off.
    """

    # compute_loss returns a per-token mean: the Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, distill_config: TrainConfig | None = None, **kwargs):
        args_obj = kwargs.get("args") or (args[1] if len(args) > 1 else None)
        if args_obj is not None:
            args_obj.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.distill_config = distill_config or TrainConfig()
        self.model_accepts_loss_kwargs = False  # older transformers: same meaning as above

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if self.distill_config.loss != "online_kl":
            inputs.pop("teacher", None)
        loss = compute_loss(model, inputs, self.distill_config, validate=self.state.global_step == 0)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and `save_model`: the LoRA adapter (PEFT format) when the model has
        pdengine adapters, as PEFT's own models save; otherwise the Trainer's full save."""
        from pdengine.lora import lora_modules, save_adapter

        model = self.accelerator.unwrap_model(self.model)
        if not lora_modules(model):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        save_adapter(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """`train(resume_from_checkpoint=...)` from a checkpoint `_save` wrote: the adapter
        back into the model's LoRA layers (optimizer and scheduler: the Trainer's own)."""
        from pdengine.lora import load_adapter, lora_modules

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not lora_modules(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(target, resume_from_checkpoint)
        return None
