"""LoRA for Hugging Face causal LMs, with adapters in PEFT's on-disk format.

- `add_lora` wraps the chosen `nn.Linear` modules in `LoRALinear` (which runs the fused
  `pdengine.lora_linear` op) and `nn.Embedding` modules in `LoRAEmbedding`, with PEFT's
  initialisation and parameter names, and freezes everything else.
- `lm_head=True` puts a LoRA on the lm_head. The trainer never calls that module: it takes
  `lm_head_lora(model)` into the fused loss; generation calls the module as usual.
- `disable_adapters` (the teacher = the same model without its adapters), `merge_adapter`.
- `save_adapter` / `load_adapter` read and write `adapter_config.json` +
  `adapter_model.safetensors` (files: `pdengine.peft_format`) exactly as PEFT does (keys
  `base_model.model.<module>.lora_A.weight`, `.lora_embedding_A`, ...), so PEFT, vLLM and
  other PEFT readers load our adapters and we load theirs; PEFT's older pickled
  `adapter_model.bin` loads through `torch.load(weights_only=True)`, never unsafely.
  Unlike PEFT, loading fails with an InputError (one line naming the file) on a missing,
  truncated or refused file and on missing, unexpected or wrongly shaped keys.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pdengine import peft_format
from pdengine.errors import InputError
from pdengine.ops.lora_linear import lora_linear
from pdengine.peft_format import KEY_PREFIX
from pdengine.reference import DROPOUT_INDEX_MUL, DROPOUT_SEED_MUL  # the keep-mask's hash (the spec)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------ dropout at a row offset

# The keep-mask hashes (seed, flat index of the layer's input): h = i * M_I + seed * M_S + c
# mod 2**32 (`reference.dropout_keep_mask`). A rank computing the rows [t0, ...) of a batch
# that one process computes whole sees local indices i - t0 * d_in; shifting the seed by
# t0 * d_in * M_I / M_S (mod 2**32; M_S is odd, so invertible) gives it the one-process
# mask without any kernel knowing about offsets (`pdengine.training.parallel`).
_SEED_SHIFT_PER_INDEX = DROPOUT_INDEX_MUL * pow(DROPOUT_SEED_MUL, -1, 1 << 32) % (1 << 32)
_ROW_OFFSET = [0]  # a plain global, not a ContextVar: torch.compile(fullgraph=True) reads it


@contextlib.contextmanager
def dropout_row_offset(rows: int):
    """LoRA dropout inside this block draws the masks of input rows `rows`, `rows + 1`, ...
    of a longer batch (the row = token index of the packed row)."""
    previous, _ROW_OFFSET[0] = _ROW_OFFSET[0], int(rows)
    try:
        yield
    finally:
        _ROW_OFFSET[0] = previous


def dropout_seed(in_features: int):
    """The dropout seed of one LoRA layer call: None (`lora_linear` draws it, the one-process
    path, torch.compile included) at offset 0, else a seed drawn the same way and shifted for
    the current `dropout_row_offset`, in the signed 32-bit range (every backend takes it
    mod 2**32)."""
    from pdengine.ops.lora_linear import draw_seed

    rows = _ROW_OFFSET[0]
    if rows == 0:
        return None
    seed = draw_seed()
    shifted = (seed + rows * in_features * _SEED_SHIFT_PER_INDEX) % (1 << 32)
    return shifted - (1 << 32) if shifted >= 1 << 31 else shifted


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Half-precision models get fp32 adapters (PEFT's autocast_adapter_dtype default):
    the optimizer updates of a LoRA at lr 1e-5 would vanish in bf16."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class _LoRAMixin:
    """State shared by the LoRA wrappers: hyper-parameters, the on/off switch."""

    def _init_lora(self, base, r, alpha, dropout, rslora):
        self.base_layer = base
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, alpha, dropout, rslora
        self.scale = _lora_scale(r, alpha, rslora)
        self.disabled = False

    @property
    def weight(self):
        """The frozen base weight (HF helpers such as tie_weights look for `.weight`)."""
        return self.base_layer.weight

    def extra_repr(self):
        return f"r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, scale={self.scale:g}"


class LoRALinear(_LoRAMixin, nn.Module):
    """`base(x) + scale * B(A(dropout(x)))` through the fused op; PEFT parameter names
    `lora_A.weight [r, in]`, `lora_B.weight [out, r]`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self._init_lora(base, r, alpha, dropout, rslora)
        kw = {"device": base.weight.device, "dtype": _adapter_dtype(base.weight.dtype)}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, [out, in] in fp32 (what merging adds to the base weight)."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x):
        if self.disabled:
            return self.base_layer(x)
        base = self.base_layer
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(
            x.to(base.weight.dtype), base.weight, self.lora_A.weight, self.lora_B.weight,
            self.scale, base.bias, p, dropout_seed(self.in_features) if p > 0 else None,
        )


class LoRAEmbedding(_LoRAMixin, nn.Module):
    """PEFT's embedding LoRA: `embed(x) + scale * F.embedding(x, A^T) B^T`, parameters
    `lora_embedding_A [r, num_embeddings]` (init zeros), `lora_embedding_B [dim, r]` (init
    normal). No dropout on ids, as in PEFT. Scaled embeddings (Gemma 3's `embed_scale`)
    scale the LoRA term too, as in PEFT."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self._init_lora(base, r, alpha, dropout, rslora)
        kw = {"device": base.weight.device, "dtype": _adapter_dtype(base.weight.dtype)}
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(base.embedding_dim, r, **kw))
        nn.init.normal_(self.lora_embedding_B)

    def delta_weight(self) -> torch.Tensor:
        """scale * (B A)^T, [num_embeddings, dim] in fp32."""
        return self.scale * (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T

    def forward(self, ids):
        out = self.base_layer(ids)
        if self.disabled:
            return out
        base = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A.T, padding_idx=base.padding_idx,
                              max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        delta = (after_a @ self.lora_embedding_B.T) * self.scale
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            delta = delta * (embed_scale.to(delta.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        return (out + delta).to(out.dtype)


LORA_LAYERS = (LoRALinear, LoRAEmbedding)


# --------------------------------------------------------------------- target matching


def _output_layer_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a string is a regex matched against the full module name, a list
    matches a module whose name is an entry or ends with '.' + an entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _find_targets(model, target_modules, lm_head: bool) -> list[str]:
    head_name = _output_layer_name(model)
    if target_modules == "all-linear":  # PEFT's shorthand: every Linear but the output layer
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head_name]
    else:
        names = [n for n, _ in model.named_modules() if n and _matches(n, target_modules)]
    if lm_head:
        if head_name is None:
            raise ValueError(f"lm_head=True but {type(model).__name__} has no output embeddings")
        names.append(head_name)
    names = list(dict.fromkeys(names))  # dedupe, keep order
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matches no module of {type(model).__name__}"
        )
    modules = dict(model.named_modules())
    for n in names:
        if isinstance(modules[n], LORA_LAYERS):
            raise ValueError(f"module {n!r} already has a LoRA adapter (merge_adapter it first)")
        if not isinstance(modules[n], (nn.Linear, nn.Embedding)):
            raise ValueError(
                f"target module {n!r} is a {type(modules[n]).__name__}; "
                "only nn.Linear and nn.Embedding can take a LoRA"
            )
    return names


def _set_module(model, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model) -> dict[str, nn.Module]:
    """name -> LoRA layer, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


# -------------------------------------------------------------------------- public API


def add_lora(model, r, alpha, dropout=0.0, target_modules=None, lm_head=False, rslora=False):
    """Wrap the target modules of `model` with LoRA layers (in place) and freeze the rest.

    Args:
        r: rank (>= 1). alpha: LoRA alpha; scale = alpha / r (alpha / sqrt(r) with rslora).
        dropout: LoRA dropout on the input of the low-rank path (training mode only).
        target_modules: list of module names (matched as suffixes, like PEFT), a regex
            string (full match), "all-linear", or None for q/k/v/o/gate/up/down.
            nn.Embedding targets (e.g. "embed_tokens") get a PEFT-style LoRAEmbedding.
        lm_head: also put a LoRA on the output layer (see `lm_head_lora`).
    Returns: the same model; only LoRA parameters have requires_grad=True.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if target_modules is None:
        target_modules = list(DEFAULT_TARGET_MODULES)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    names = _find_targets(model, target_modules, lm_head)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer_cls = LoRAEmbedding if isinstance(base, nn.Embedding) else _linear_lora_class(base)
        _set_module(model, name, layer_cls(base, r, alpha, dropout, rslora))
    model.pdengine_lora_config = {
        "r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "use_rslora": bool(rslora),
        "target_modules": _saved_targets(target_modules, names[-1] if lm_head else None),
    }
    return model


def _linear_lora_class(base):
    """LoRALinear, or for a bitsandbytes 4/8-bit base pdengine.qlora's layer (which
    dequantizes it; docs/DESIGN.md, "Quantized base")."""
    from pdengine.qlora import quantized_lora_class  # lazy: pdengine.qlora imports this module

    return quantized_lora_class(base) or LoRALinear


def _saved_targets(target_modules, head_name):
    """target_modules as adapter_config.json records them (the lm_head included)."""
    if head_name is None:
        return target_modules if isinstance(target_modules, str) else sorted(set(target_modules))
    if isinstance(target_modules, str):
        return f"(?:{target_modules})|{re.escape(head_name)}"
    return sorted(set(target_modules) | {head_name.rpartition(".")[2]})


def lm_head_lora(model):
    """What the fused loss needs from the output layer: `(weight, lora_a, lora_b, scale)`.

    lora_a / lora_b are None (and scale 0.0) when the lm_head has no active LoRA (none was
    added, or inside `disable_adapters`).
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    if isinstance(head, LoRALinear):
        if head.disabled:
            return head.base_layer.weight, None, None, 0.0
        return head.base_layer.weight, head.lora_A.weight, head.lora_B.weight, head.scale
    return head.weight, None, None, 0.0


@contextlib.contextmanager
def disable_adapters(model):
    """Run `model` without its LoRA adapters inside the block (the teacher)."""
    layers = list(lora_modules(model).values())
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def _untie_if_shared(model, module_name: str, base: nn.Module) -> None:
    """Give `base` its own weight when another module shares it (tied embeddings), so
    merging one module's LoRA does not change the other module."""
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is base.weight]
    if len(owners) > 1:
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False


def merge_adapter(model):
    """Fold every LoRA into its base weight and put the plain modules back (in place).

    Tied input/output embeddings are untied first when only one side has a LoRA, so the
    merged model computes exactly what the adapted one did.
    """
    from pdengine.qlora import refuse_quantized_merge

    refuse_quantized_merge(model)  # a 4/8-bit weight cannot absorb the LoRA without requantizing
    for name, layer in lora_modules(model).items():
        base = layer.base_layer
        if not layer.disabled:
            _untie_if_shared(model, name, base)
            with torch.no_grad():
                base.weight.add_(layer.delta_weight().to(base.weight.dtype))
        _set_module(model, name, base)
    model.__dict__.pop("pdengine_lora_config", None)
    return model


# ------------------------------------------------------------------ PEFT file format


def _peft_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_modules(model).items():
        key = KEY_PREFIX + name
        if isinstance(layer, LoRALinear):
            out[f"{key}.lora_A.weight"] = layer.lora_A.weight
            out[f"{key}.lora_B.weight"] = layer.lora_B.weight
        else:
            out[f"{key}.lora_embedding_A"] = layer.lora_embedding_A
            out[f"{key}.lora_embedding_B"] = layer.lora_embedding_B
    return out


def save_adapter(model, path) -> Path:
    """Write the model's LoRA adapter to directory `path` in PEFT's format; returns path."""
    cfg = getattr(model, "pdengine_lora_config", None)
    if cfg is None:
        raise ValueError("model has no LoRA adapters (call add_lora or load_adapter first)")
    base_name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _peft_state_dict(model).items()}
    return peft_format.write_adapter(path, peft_format.adapter_config(cfg, base_name), tensors)


def _base_layer_keys(model, found: dict) -> dict[str, torch.Tensor]:
    """PEFT also saves `<module>.base_layer.weight` for targeted embedding layers; those
    are base weights (loaded as PEFT does) and must fit a LoRA-wrapped module."""
    layers = lora_modules(model)
    out = {}
    for key in found:
        if key.endswith(".base_layer.weight"):
            name = key[len(KEY_PREFIX):-len(".base_layer.weight")]
            if name in layers:
                out[key] = layers[name].base_layer.weight
    return out


def _apply_hyperparameters(model, config) -> None:
    """The adapter's alpha / rsLoRA / dropout win over those of existing LoRA layers."""
    alpha, rslora = config["lora_alpha"], bool(config.get("use_rslora", False))
    for layer in lora_modules(model).values():
        layer.lora_alpha, layer.use_rslora = alpha, rslora
        layer.lora_dropout = float(config.get("lora_dropout") or 0.0)
        layer.scale = _lora_scale(layer.r, alpha, rslora)
    if hasattr(model, "pdengine_lora_config"):
        model.pdengine_lora_config.update(lora_alpha=alpha, use_rslora=rslora,
                                          lora_dropout=float(config.get("lora_dropout") or 0.0))


def load_adapter(model, path):
    """Load a PEFT-format LoRA adapter from directory `path` into `model` (in place).

    Adds the LoRA layers the config names when the model has none; a model that already
    has LoRA layers must have exactly the adapter's. Raises InputError for a missing,
    truncated or refused file, an unsupported PEFT feature, or keys that are missing,
    unexpected or wrongly shaped.
    """
    path = Path(path)
    config = peft_format.read_config(path)
    found = peft_format.read_weights(path)
    if lora_modules(model):
        _copy_adapter(model, path, found)
        _apply_hyperparameters(model, config)
        return model
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:  # add_lora checks the targets before it changes the model
        add_lora(model, config["r"], config["lora_alpha"], float(config.get("lora_dropout") or 0.0),
                 target_modules=config["target_modules"], rslora=bool(config.get("use_rslora", False)))
    except ValueError as e:  # the adapter's config does not fit this model
        raise InputError(f"{path / peft_format.CONFIG_NAME}: {e}") from None
    try:
        _copy_adapter(model, path, found)
    except InputError:  # leave the model as it came
        _remove_lora(model, requires_grad)
        raise
    return model


def _remove_lora(model, requires_grad: dict) -> None:
    for name, layer in lora_modules(model).items():
        _set_module(model, name, layer.base_layer)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, p.requires_grad))
    model.__dict__.pop("pdengine_lora_config", None)


def _copy_adapter(model, path: Path, found: dict) -> None:
    expected = _peft_state_dict(model)
    base_weights = _base_layer_keys(model, found)
    peft_format.check_keys(path, {**expected, **base_weights}, found)
    with torch.no_grad():
        for key, param in {**expected, **base_weights}.items():
            param.copy_(found[key].to(param.device, param.dtype))
