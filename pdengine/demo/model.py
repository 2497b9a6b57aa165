"""The demo's tiny Llama-architecture model (about 0.5 M parameters)."""
from __future__ import annotations


def tiny_llama_config(tokenizer, *, hidden_size: int = 128, layers: int = 2, heads: int = 4,
                      ffn: int = 384, max_positions: int = 512):
    """A small `LlamaConfig` sized for the word-level demo tokenizer (tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


def build_tiny_model(tokenizer, seed: int = 0, **config_overrides):
    """A freshly initialised `LlamaForCausalLM` (fp32), deterministic for a seed."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **config_overrides))
