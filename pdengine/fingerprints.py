"""What a teacher cache was made with: the model, tokenizer and template, identified by
their content, never by a path (docs/DESIGN.md, "Cache format").

Each fingerprint is a dict: `fingerprint` (a hash of everything that identifies the
object) plus the readable fields it was computed from, so that a mismatch names the
field that differs (`model_differences`, `tokenizer_differences`, `check_compatible`)
instead of printing two hashes. The same model loaded from `data/model` or from `/abs/path/data/model`, on
CPU in fp32 or on a GPU in bf16, has the same fingerprint; `dtype` is recorded beside it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch

from pdengine.errors import InputError
from pdengine.modeling import output_layer

# Config keys that name, place or run a model without changing what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "use_cache", "_attn_implementation", "_attn_implementation_autoset",
                         "architectures", "output_hidden_states", "output_attentions", "return_dict",
                         "_commit_hash",
                         # recorded as `quantization` instead: its compute dtype is the device's
                         "quantization_config"}
_SAMPLE = 4096  # values hashed per parameter tensor (all of them when it has fewer)


def sha256_of(*parts) -> str:
    """A short stable hash of bytes and JSON-able values."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------
# Model


def vocab_size_of(model) -> int:
    """Rows of the lm_head: the support of the teacher's distribution. (A LoRA-wrapped head
    exposes its frozen weight as `.weight` too, see pdengine.lora.LoRALinear.)"""
    return int(output_layer(model).weight.shape[0])


def model_config(model) -> dict:
    """The model's config as plain JSON values, minus keys that do not change its outputs."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _base_parameters(model):
    """(name, tensor) of the base model's parameters: LoRA adapters are left out and their
    wrappers see through (`q_proj.base_layer.weight` is `q_proj.weight`), so a student with
    adapters and the plain teacher it was distilled from share one weights hash."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, param


def _weight_sample(weight: torch.Tensor) -> bytes:
    # Evenly spaced values (both ends included), rounded to bf16 first so that a bf16 (GPU)
    # and an fp32 (CPU) copy of one checkpoint agree; hashing every value of a 7B model
    # would cost seconds on each check for no practical gain (a fine-tune moves them all).
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    if n > _SAMPLE:  # integer positions: a float32 linspace overshoots beyond 2**24 elements
        # index_select: plain `flat[positions]` costs ~400x more here (20 ms for a 32M tensor).
        flat = flat.index_select(0, torch.arange(_SAMPLE, device=flat.device) * (n - 1) // (_SAMPLE - 1))
    return flat.to("cpu", torch.bfloat16).float().numpy().tobytes()


def weights_hash(model) -> str:
    """Hash of every base parameter's name, shape and sampled values."""
    h = hashlib.sha256()
    for name, param in _base_parameters(model):
        h.update(f"{name}:{tuple(param.shape)};".encode())
        h.update(_weight_sample(param))
    return h.hexdigest()[:32]


def model_fingerprint(model) -> dict:
    """Identity of a model: its config, a hash of its weights, its vocabulary size and its
    quantization (`pdengine.quantize.quantization_identity`: None for a plain model, whose
    fingerprint is then what it was before quantization existed)."""
    from pdengine.quantize import quantization_identity

    config, weights, vocab = model_config(model), weights_hash(model), vocab_size_of(model)
    quantization = quantization_identity(model)
    dtype = next((str(p.dtype).removeprefix("torch.") for _, p in _base_parameters(model)), None)
    parts = (config, weights, vocab) if quantization is None else (config, weights, vocab, quantization)
    return {"fingerprint": sha256_of(*parts), "model_type": config.get("model_type"),
            "config": config, "weights_sha256": weights, "vocab_size": vocab, "dtype": dtype,
            "quantization": quantization}


def model_differences(cached: dict, given: dict) -> list[str]:
    """What differs between two model fingerprints, field by field ("config.hidden_size:
    cache 64, given 32"); the dtype is not compared (see the module docstring)."""
    problems = []
    if cached.get("vocab_size") != given["vocab_size"]:
        problems.append(f"vocab size: cache {cached.get('vocab_size')}, given {given['vocab_size']}")
    old_config, new_config = _flat(cached.get("config") or {}), _flat(given["config"])
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key, "<absent>") != new_config.get(key, "<absent>"):
            problems.append(f"config.{key}: cache {_short(old_config.get(key, '<absent>'))}, "
                            f"given {_short(new_config.get(key, '<absent>'))}")
    if cached.get("quantization") != given.get("quantization"):
        from pdengine.quantize import quantization_name

        cached_q, given_q = quantization_name(cached.get("quantization")), quantization_name(given.get("quantization"))
        problems.append(f"quantization: cache {cached_q}, given {given_q} (the student's base must be the "
                        f"teacher's: load it with --quantize {cached_q})")
    elif cached.get("weights_sha256") != given["weights_sha256"]:
        problems.append(f"weights: cache hash {cached.get('weights_sha256')}, given {given['weights_sha256']} "
                        "(same config, other weights: another checkpoint or a merged fine-tune)")
    if not problems and cached.get("fingerprint") != given["fingerprint"]:
        problems.append(f"model fingerprint: cache {cached.get('fingerprint')}, given {given['fingerprint']}, "
                        "although config, weights and vocabulary agree (was the manifest edited?)")
    return problems


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested config dicts as dotted keys, so a difference names the innermost field
    (`rope_parameters.rope_theta`)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# Tokenizer and template


def tokenizer_fingerprint(tokenizer) -> dict:
    """Identity of a tokenizer: its vocabulary (token -> id) and special tokens.

    Its splitting rules are left out on purpose: the cache stores token ids, and prefill's
    `inputs_fingerprint` covers the ids its inputs tokenized to; the rules' serialized form
    also changes with the transformers version that loads the same files."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {"map": tokenizer.special_tokens_map, "eos": tokenizer.eos_token_id,
                "bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id}
    specials = json.loads(json.dumps(specials, sort_keys=True, default=str))
    vocab_hash = sha256_of(vocab)
    return {"fingerprint": sha256_of(vocab_hash, specials), "size": len(tokenizer),
            "vocab_sha256": vocab_hash, "specials": specials}


def tokenizer_differences(cached: dict, given: dict) -> list[str]:
    """What differs between two tokenizer fingerprints, field by field."""
    problems = []
    if cached.get("size") != given["size"]:
        problems.append(f"tokenizer size: cache {cached.get('size')} tokens, given {given['size']}")
    elif cached.get("vocab_sha256") != given["vocab_sha256"]:
        problems.append("tokenizer vocabulary: same size, other tokens or ids")
    if cached.get("specials") != given["specials"]:
        problems.append(f"tokenizer special tokens: cache {_short(cached.get('specials'), 120)}, "
                        f"given {_short(given['specials'], 120)}")
    if not problems and cached.get("fingerprint") != given["fingerprint"]:
        problems.append(f"tokenizer fingerprint: cache {cached.get('fingerprint')}, given {given['fingerprint']}, "
                        "although vocabulary and special tokens agree (was the manifest edited?)")
    return problems


def template_fingerprint(tokenizer, fmt) -> dict:
    """Identity of the prompt template: the chat template text (or the plain template) + PromptFormat."""
    from pdengine.prompts import PLAIN_TEMPLATE

    template = getattr(tokenizer, "chat_template", None) or f"plain:{PLAIN_TEMPLATE}"
    return {"fingerprint": sha256_of(template, asdict(fmt)), "chat_template": template != f"plain:{PLAIN_TEMPLATE}",
            "format": asdict(fmt)}


# ---------------------------------------------------------------------------------------
# A cache against the objects it is used with


def check_compatible(manifest: dict, source: str, *, model=None, tokenizer=None, temperature=None) -> None:
    """InputError naming every field that differs between the cache and the given objects
    (cached value, given value)."""
    problems = []
    if model is not None:
        given = model_fingerprint(model)
        if given["vocab_size"] != manifest["vocab_size"]:
            problems.append(f"vocab size: cache {manifest['vocab_size']}, model {given['vocab_size']}")
        differences = [d for d in model_differences(manifest["model"], given) if not d.startswith("vocab size")]
        if differences:
            problems.append(f"model: cache made with {manifest['model'].get('model_type')}, given "
                            f"{given['model_type']}: " + ", ".join(differences))
    if tokenizer is not None:
        problems += tokenizer_differences(manifest["tokenizer"], tokenizer_fingerprint(tokenizer))
    if temperature is not None and float(temperature) != manifest["temperature"]:
        problems.append(f"temperature: cache {manifest['temperature']}, given {float(temperature)}")
    if problems:
        raise InputError(f"teacher cache {source} does not match: " + "; ".join(problems))
