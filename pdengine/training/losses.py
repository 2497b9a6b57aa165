"""The three training losses on a packed student batch (docs/DESIGN.md, "Fused loss").

- `pd`: forward KL(teacher || student) over the teacher's cached top-k at `temperature`
  (no T^2 factor), optionally plus `ce_weight` * cross-entropy (at `temperature` by
  default; at `ce_temperature` when given, e.g. 1 as in the KD convention).
- `sft`: cross-entropy on the answer tokens: the same fused op with k = 1 (teacher id =
  label, log-prob 0).
- `online_kl`: the paper's original: the teacher (the same model, adapters disabled,
  document in its prompt) runs now, and the full-vocabulary KL is taken on materialized
  logits. A baseline; slow and memory-hungry by design.

The model *body* runs on the packed row (restarted positions and no KV cache, so the
model's own attention keeps the sequences apart); only the hidden states at the target positions meet the lm_head,
inside the fused `linear_topk_kl` op, so the `[tokens, vocab]` logits never exist.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pdengine import modeling
from pdengine.errors import InputError
from pdengine.training.config import TrainConfig


def to_device(batch: dict, device) -> dict:
    """Tensors of the batch (and of nested dicts: the packed teacher) on `device`."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        return to_device(v, device) if isinstance(v, dict) else v

    return {k: move(v) for k, v in batch.items()}


def target_hidden(model, batch) -> torch.Tensor:
    """Final hidden states at the target positions, `[M, d]`; no logits are formed.

    Packed batches (`segment_ids` present) go in with their restarted `position_ids` and no
    mask: the model's own attention (flash-attention varlen, FlexAttention, or sdpa with the
    mask transformers derives from the positions) keeps the sequences apart, which it does
    only without a KV cache (`hidden_states` passes use_cache=False; docs/DESIGN.md,
    "Attention paths"). A batch without `segment_ids` is `[B, T]` rows of one sequence each
    (optional `attention_mask` for right padding), and `target_positions` index the
    flattened `B * T` positions.
    """
    mask = None if "segment_ids" in batch else batch.get("attention_mask")
    hidden = modeling.hidden_states(model, batch["input_ids"], batch.get("position_ids"), mask)
    return hidden.reshape(-1, hidden.shape[-1])[batch["target_positions"]]


def _head(model):
    from pdengine.lora import lm_head_lora

    return lm_head_lora(model)


def _fused_loss(model, hidden, teacher_ids, teacher_logprobs, labels, *, temperature, mode, ce_weight,
                validate):
    from pdengine.ops.linear_topk_kl import linear_topk_kl

    weight, lora_a, lora_b, scale = _head(model)
    return linear_topk_kl(
        hidden.to(weight.dtype), weight, teacher_ids, teacher_logprobs, labels=labels,
        lora_a=lora_a, lora_b=lora_b, lora_scale=scale, temperature=temperature,
        softcap=modeling.final_logit_softcap(model), mode=mode, ce_weight=ce_weight, validate=validate,
    )


def _separate_ce(config: TrainConfig) -> bool:
    """Whether the CE term needs its own pass: the fused op takes one temperature."""
    t = config.ce_temperature
    return config.ce_weight > 0 and t is not None and t != config.temperature


def pd_loss(model, batch, config: TrainConfig, validate: bool = True) -> torch.Tensor:
    """Top-k KL against the cached teacher (+ optional CE), mean over answer tokens.

    The CE is the fused op's own term (at the distillation temperature) unless
    `ce_temperature` asks for another one: then a second fused pass, k = 1 as in
    `sft_loss`, gives the hard-label CE at that temperature (docs/DESIGN.md, "Fused loss")."""
    hidden = target_hidden(model, batch)
    separate = _separate_ce(config)
    loss = _fused_loss(
        model, hidden, batch["topk_ids"], batch["topk_logprobs"], batch["labels"],
        temperature=config.temperature, mode=config.mode, ce_weight=0.0 if separate else config.ce_weight,
        validate=validate,
    )
    if separate:
        loss = loss + config.ce_weight * _label_ce(model, hidden, batch["labels"], config.ce_temperature, validate)
    return loss


def _label_ce(model, hidden, labels, temperature, validate) -> torch.Tensor:
    """Hard-label cross-entropy at `temperature`: the fused op with k = 1 and log-prob 0."""
    zeros = torch.zeros(labels.shape[0], 1, device=labels.device)
    return _fused_loss(model, hidden, labels[:, None], zeros, labels, temperature=temperature, mode="tail",
                       ce_weight=0.0, validate=validate)


def sft_loss(model, batch, config: TrainConfig, validate: bool = True) -> torch.Tensor:
    """Cross-entropy on the answer tokens: the fused op with k = 1 and log-prob 0."""
    return _label_ce(model, target_hidden(model, batch), batch["labels"], 1.0, validate)


def teacher_logprobs(model, teacher_batch, temperature) -> torch.Tensor:
    """Full-vocabulary teacher log-probs at the answer positions (adapters disabled)."""
    from pdengine.lora import disable_adapters

    with torch.no_grad(), disable_adapters(model):
        hidden = target_hidden(model, teacher_batch)
        logits = modeling.full_logits(hidden, modeling.output_layer(model).weight,
                                      softcap=modeling.final_logit_softcap(model))
        return torch.log_softmax(logits / temperature, dim=-1)


def online_kl_loss(model, batch, config: TrainConfig, validate: bool = True) -> torch.Tensor:
    """The paper's original loss: teacher forward now, full-vocabulary KL, materialized.

    `batch["teacher"]` holds the packed teacher sequences (`batching.pack_teacher`); the
    trainer adds it from the cache items in `batch["indices"]`.
    """
    if "teacher" not in batch:
        raise InputError("online_kl needs batch['teacher'] (packed teacher sequences; see pack_teacher)")
    teacher = teacher_logprobs(model, batch["teacher"], config.temperature)
    weight, lora_a, lora_b, scale = _head(model)
    logits = modeling.full_logits(target_hidden(model, batch), weight, (lora_a, lora_b, scale),
                                  modeling.final_logit_softcap(model))
    student = torch.log_softmax(logits / config.temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


_LOSS_FUNCTIONS = {"pd": pd_loss, "sft": sft_loss, "online_kl": online_kl_loss}


def compute_loss(model, batch: dict, config: TrainConfig, *, validate: bool = True) -> torch.Tensor:
    """The scalar training loss of one packed batch for `config.loss` (batch moved to the
    model's device). Plain examples (`pack_examples` of non-cache dicts) always train with
    cross-entropy. validate: let the fused op check ids and log-probs (one host sync;
    the trainer does it on the first batch of each source only)."""
    batch = to_device(batch, modeling.output_layer(model).weight.device)
    if batch.get("cross_entropy_only"):
        return sft_loss(model, batch, config, validate)
    return _LOSS_FUNCTIONS[config.loss](model, batch, config, validate)


def batch_loss(model, batch: dict, *, loss: str = "pd", temperature: float = 2.0, mode: str = "tail",
               ce_weight: float = 0.0, validate: bool = True) -> torch.Tensor:
    """The distillation loss of one packed batch (`cache.batches(...)`), for any training loop.

    It honours what a packed batch needs and a hand-written loss easily misses: the
    restarted `position_ids` (which, without a KV cache, keep packed sequences apart), and the
    `target_positions` just before each answer token. `temperature` must be the cache's.
    Equal to `compute_loss(model, batch, TrainConfig(loss=..., temperature=..., ...))`.
    """
    config = TrainConfig(loss=loss, temperature=temperature, mode=mode, ce_weight=ce_weight)
    return compute_loss(model, batch, config, validate=validate)
