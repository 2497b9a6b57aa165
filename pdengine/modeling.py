"""Small adapters between pdengine and Hugging Face causal LMs.

pdengine never asks a model for logits in training or prefill: it runs the model body
(embeddings, blocks, final norm) and hands the final hidden states to a fused op
together with the lm_head weight. These helpers find those pieces on any HF causal LM
and build the block attention masks used for packed and shared-prefix sequences.
"""
from __future__ import annotations

import torch


def model_body(model):
    """The decoder stack without the lm_head (LlamaModel inside LlamaForCausalLM, ...)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None:
        raise ValueError(f"cannot find the decoder body of {type(model).__name__}")
    return body


def output_layer(model):
    """The lm_head module (`model.get_output_embeddings()`)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head


def final_logit_softcap(model) -> float | None:
    """Gemma 2 and later soft-cap their logits: c * tanh(u / c)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def segment_attention_mask(segment_ids: torch.Tensor, parent=None) -> torch.Tensor:
    """Boolean `[1, 1, T, T]` mask for one packed row (True = may attend).

    Token t attends to an earlier-or-same token s when both lie in the same segment, or
    when s lies in the parent segment of t's segment (`parent[seg] = -1` for none). Packed
    training uses no parents (sequences isolated); shared-prefix prefill makes every QA
    suffix a child of its document's prefix segment.
    """
    seg = segment_ids.reshape(-1)
    same = seg[:, None] == seg[None, :]
    if parent is not None:
        parent = torch.as_tensor(parent, device=seg.device)
        same = same | (parent[seg][:, None] == seg[None, :])
    causal = torch.ones_like(same).tril()
    return (same & causal)[None, None]


def hidden_states(model, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
    """Final (normed) hidden states `[B, T, d]` of the model body; no logits are formed."""
    out = model_body(model)(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def greedy_pack(sizes, budget: int, overhead: int = 0) -> list[list[int]]:
    """Group consecutive items greedily: a group takes the next item while `overhead` plus
    its items' sizes stay within `budget` (an item too large alone gets a group of its own).
    Returns lists of indices into `sizes`. Used for packed training batches and prefill rows.
    """
    groups, current, used = [], [], overhead
    for i, size in enumerate(sizes):
        if current and used + size > budget:
            groups.append(current)
            current, used = [], overhead
        current.append(i)
        used += size
    if current:
        groups.append(current)
    return groups


def full_logits(hidden: torch.Tensor, weight: torch.Tensor, lora=None, softcap: float | None = None) -> torch.Tensor:
    """Materialized float32 logits `[N, V]` of hidden states `[..., d]`: h W^T, plus the
    lm_head's LoRA `(A, B, scale)` when given, then the optional soft-cap c * tanh(u / c).

    Only for what needs the whole distribution (the online_kl baseline's full-vocabulary
    KL); training and prefill never form logits (docs/DESIGN.md, "Fused loss").
    """
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    out = h @ weight.float().T
    if lora is not None and lora[0] is not None:
        lora_a, lora_b, scale = lora
        out = out + scale * (h @ lora_a.float().T) @ lora_b.float().T  # same order as the reference
    return softcap * torch.tanh(out / softcap) if softcap else out
