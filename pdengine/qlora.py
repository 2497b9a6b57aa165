"""LoRA on a quantized frozen base (docs/DESIGN.md, "Quantized base").

- `QuantizedLoRALinear`: a LoRA layer on a `bnb.nn.Linear4bit` (NF4) or `Linear8bitLt`
  base, a `pdengine.lora.LoRALinear` for everything else (names, saving, disabling).
- `quantized_lora_class(base)`: what `pdengine.lora.add_lora` wraps a bitsandbytes layer in.
- `quantize_model(model, quantize)`: quantize a model in memory as loading would, LoRA
  layers included (their adapters kept).
- `refuse_quantized_merge(model)`: merging into a 4/8-bit weight is refused.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pdengine.errors import InputError
from pdengine.lora import LoRALinear, dropout_seed  # pdengine.lora imports this module lazily, inside functions
from pdengine.quantize import (
    NF4_BLOCKSIZE, is_linear4bit, compute_dtype_for, disable_cpu_repacking, import_bitsandbytes,
    is_quantized_linear, nf4_weight, parse_quantize, pin_int8_forward, refuse_misdecoded_cpu_shapes,
)


def quantized_lora_class(base):
    """The LoRA layer class for `base` when it is a bitsandbytes layer, else None
    (`pdengine.lora.add_lora` asks this before wrapping an nn.Linear)."""
    return QuantizedLoRALinear if is_quantized_linear(base) else None


class QuantizedLoRALinear(LoRALinear):
    """LoRA on a frozen `bnb.nn.Linear4bit` (NF4) or `Linear8bitLt` base, PEFT's names
    (`lora_A.weight [r, in]`, `lora_B.weight [out, r]`), adapters in fp32 (bf16 compute).

    NF4: `y = x Wq^T (+ bias) + s (dropout(x) A^T) B^T` through `lora_linear_nf4`, which
    dequantizes the packed weight in the forward and again in the backward (dx), so no
    dense copy of any layer outlives its matmul; on CUDA tile by tile inside the GEMM.
    int8: the base term is the layer's own forward, pinned by `quantize.pin_int8_forward` to
    one function (dequantize, then matmul) in training and eval alike, so that it is the
    teacher's; plus the low-rank term in torch.
    """

    def __init__(self, base, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)
        self._init_lora(base, r, alpha, dropout, rslora)
        compute = getattr(base, "compute_dtype", None) or compute_dtype_for(base.weight.device)
        kw = {"device": base.weight.device,
              "dtype": torch.float32 if compute in (torch.float16, torch.bfloat16) else compute}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def from_lora(cls, layer: LoRALinear, quantized_base):
        """`layer`'s adapters (the same parameters) on `quantized_base`."""
        new = cls(quantized_base, layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora)
        new.lora_A, new.lora_B = layer.lora_A, layer.lora_B
        new.scale, new.disabled = layer.scale, layer.disabled
        return new.train(layer.training)

    def forward(self, x):
        base = self.base_layer
        if self.disabled:
            return base(x)
        p = self.lora_dropout if self.training else 0.0
        # under torchrun a rank's share of the packed row draws the one-process masks
        seed = dropout_seed(self.in_features) if p > 0 else None
        if is_linear4bit(base):
            from pdengine.ops.lora_linear_nf4 import lora_linear_nf4

            compute = base.compute_dtype or x.dtype
            bias = None if base.bias is None else base.bias.to(compute)
            y = lora_linear_nf4(x.to(compute), self._packed_weight(), self.lora_A.weight, self.lora_B.weight,
                                self.scale, bias, p, seed)
            return y.to(x.dtype)
        return base(x) + self._low_rank(x, p, seed).to(x.dtype)

    def _packed_weight(self):
        """The base's NF4Weight, built once per placement of its bytes: reading the nested
        offset (a 0-d tensor) every call would be a host sync per layer on CUDA."""
        key = (self.base_layer.weight.data_ptr(), self.base_layer.weight.device)
        if getattr(self, "_nf4_key", None) != key:
            self._nf4_key, self._nf4 = key, nf4_weight(self.base_layer)
        return self._nf4

    def _low_rank(self, x, p, seed):
        """s * B(A(dropout(x))) with the engine's keep-mask (`reference.dropout_keep_mask`)
        under `seed` (None: a fresh one, as `lora_linear` draws it)."""
        from pdengine import reference
        from pdengine.ops.lora_linear import draw_seed

        a = self.lora_A.weight
        xd = x.to(a.dtype)
        if p > 0:
            keep = reference.dropout_keep_mask(x.shape, p, draw_seed() if seed is None else seed, device=x.device)
            xd = torch.where(keep, xd / (1 - p), torch.zeros_like(xd))
        return self.scale * (xd @ a.T) @ self.lora_B.weight.T


def quantize_model(model, quantize):
    """Quantize a model in memory, in place, as `from_pretrained` with `bnb_config` would:
    every nn.Linear but the output layer becomes its bitsandbytes layer (on its own device;
    the dense weight is dropped). LoRA layers keep their adapters and become
    QuantizedLoRALinear. Returns the model (unchanged when `quantize` is none)."""
    quantize = parse_quantize(quantize)
    if quantize is None:
        return model
    bnb = import_bitsandbytes()
    _quantize_children(model, quantize, bnb, model.get_output_embeddings())
    disable_cpu_repacking(model)
    pin_int8_forward(model)
    if any(p.device.type == "cpu" for p in model.parameters()):
        refuse_misdecoded_cpu_shapes(model)
    return model


def _quantize_children(parent, quantize, bnb, head) -> None:
    for name, child in parent.named_children():
        if child is head:
            continue
        if isinstance(child, QuantizedLoRALinear):
            continue
        if isinstance(child, LoRALinear):
            if type(child.base_layer) is nn.Linear and child.base_layer is not head:
                setattr(parent, name, QuantizedLoRALinear.from_lora(child, _quantized_linear(child.base_layer, quantize, bnb)))
        elif type(child) is nn.Linear:
            setattr(parent, name, _quantized_linear(child, quantize, bnb))
        else:
            _quantize_children(child, quantize, bnb, head)


def _quantized_linear(linear: nn.Linear, quantize: str, bnb):
    """The bitsandbytes layer of `linear` (built on the meta device, quantized by `.to`)."""
    device, weight = linear.weight.device, linear.weight.data
    has_bias = linear.bias is not None
    if quantize == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype_for(device), quant_type="nf4",
                                  compress_statistics=True, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                         compress_statistics=True, module=layer)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device).train(linear.training)


def refuse_quantized_merge(model) -> None:
    """merge_adapter cannot fold a LoRA into a 4/8-bit weight without requantizing it
    (which would change the base the adapter was trained against): InputError."""
    names = [n for n, m in model.named_modules() if is_quantized_linear(getattr(m, "base_layer", None))]
    if names:
        raise InputError(f"cannot merge a LoRA adapter into a quantized base ({len(names)} layers, e.g. {names[0]}): "
                         "save the adapter instead, or load the base without --quantize and merge there")
