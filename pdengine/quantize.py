"""A quantized frozen base (QLoRA): bitsandbytes NF4 / int8 layers under LoRA adapters
(docs/DESIGN.md, "Quantized base").

- `bnb_config(quantize, device)`: the `transformers.BitsAndBytesConfig` of `--quantize`
  (NF4 with double quantization, compute dtype bf16 on CUDA / fp32 on CPU; int8 through
  `load_in_8bit`); lm_head and embeddings stay unquantized (bitsandbytes' default).
- `from_pretrained_kwargs` / `prepare_loaded_model`: what model loading adds, including the
  check that a pre-quantized checkpoint is not asked for another quantization, and the
  AVX512-BF16 guard (`disable_cpu_repacking`).
- `dequantize_nf4`: bitsandbytes' NF4 layout decoded in plain torch (bit-exact with
  `bitsandbytes.functional.dequantize_4bit`; the specification of the Triton kernel).
- `quantization_identity`: what a model fingerprint records about the quantization.
LoRA on such a base (and quantizing a model in memory) is `pdengine/qlora.py`.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pdengine.errors import InputError

QUANTIZE_CHOICES = ("none", "nf4", "int8")
NF4_BLOCKSIZE = 64  # bitsandbytes' default, as PEFT / TRL / axolotl load NF4 bases


def parse_quantize(value) -> str | None:
    """None for no quantization, else "nf4" / "int8"; InputError for anything else."""
    if value is None or value == "none":
        return None
    if value not in QUANTIZE_CHOICES:
        raise InputError(f"--quantize {value!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    return value


def import_bitsandbytes():
    """bitsandbytes, or one InputError line saying why it cannot load."""
    # bitsandbytes logs a warning at import on AVX512-BF16 CPUs when the optional
    # `kernels` package (a faster inference GEMM) is absent: not a problem for training.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or an OSError / RuntimeError from its native library
        raise InputError(f"--quantize needs bitsandbytes, which cannot load here "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                         "install it with `pip install bitsandbytes` or run without --quantize") from None
    finally:
        cpu_ops_log.setLevel(level)
    return bitsandbytes


def compute_dtype_for(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def bnb_config(quantize, device):
    """The BitsAndBytesConfig of `quantize` on `device`, or None without quantization."""
    quantize = parse_quantize(quantize)
    if quantize is None:
        return None
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype_for(device))


# ------------------------------------------------------------------------- loading


def checkpoint_quantization(path) -> str | None:
    """How a checkpoint directory's weights are already quantized: "nf4", "fp4", "int8",
    another method's name ("gptq", ...), or None for plain weights."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # loading reports an unreadable config in its own words
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        return None
    if qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return str(qc.get("quant_method"))
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return str(qc.get("bnb_4bit_quant_type", "fp4"))
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "int8"
    return None


def from_pretrained_kwargs(path, quantize, device) -> dict:
    """Extra `from_pretrained` arguments for `quantize` (empty without quantization).

    A checkpoint saved already quantized loads as it is stored when `quantize` is None or
    "none", and is refused when another quantization is asked for.
    """
    quantize = parse_quantize(quantize)
    stored = checkpoint_quantization(path)
    if stored is not None and quantize is not None and stored != quantize:
        raise InputError(f"{path} holds weights already quantized as {stored}; it cannot be loaded with "
                         f"--quantize {quantize} (pass --quantize {stored} or none, or use the unquantized checkpoint)")
    if stored is not None:
        import_bitsandbytes()
    if quantize is None or stored is not None:
        return {"device_map": {"": str(torch.device(device))}} if stored is not None else {}
    return {"quantization_config": bnb_config(quantize, device), "device_map": {"": str(torch.device(device))}}


def is_quantized_model(model) -> bool:
    return any(is_quantized_linear(m) for m in model.modules())


def prepare_loaded_model(model, device):
    """The loaded model on `device`: a quantized one is already placed (bitsandbytes
    refuses `.to` on 8-bit models) and gets the AVX512-BF16 guard."""
    if not is_quantized_model(model):
        return model.to(device)
    disable_cpu_repacking(model)
    pin_int8_forward(model)
    if torch.device(device).type == "cpu":
        refuse_misdecoded_cpu_shapes(model)
    return model


def refuse_misdecoded_cpu_shapes(model) -> None:
    """bitsandbytes' AVX512 CPU kernel (0.50) decodes an NF4 row whose length is not a
    multiple of the blocksize with the wrong absmax (block index taken per row, not per
    flat element; tests/test_quantize.py shows it): its forward, the teacher's, would then
    not be the quantized weight. Real checkpoints have d_in a multiple of 64; refuse others."""
    for name, module in model.named_modules():
        if is_linear4bit(module) and module.in_features % module.weight.quant_state.blocksize:
            raise InputError(f"{name}: in_features {module.in_features} is not a multiple of the NF4 blocksize "
                             f"{module.weight.quant_state.blocksize}, which bitsandbytes' CPU kernels decode wrongly; "
                             "use --quantize int8, or a GPU")


def disable_cpu_repacking(model) -> int:
    """Turn off bitsandbytes' in-place CPU repacking on every `Linear4bit` of `model`.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time
    the layer runs in eval mode on an input without grad (a generation or eval pass); from
    then on its matmul goes through `gemv_4bit`, which has no autograd: gradients through
    the base are silently dropped, the computation moves to bf16 (so the teacher would no
    longer be the student's base), and the packed bytes our kernels decode are reordered.
    Returns the number of layers guarded.
    """
    count = 0
    for module in model.modules():
        if is_linear4bit(module):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError("a Linear4bit weight was repacked for the CPU before the guard ran")
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def pin_int8_forward(model) -> int:
    """Give every `Linear8bitLt` of `model` one function in every mode and on every device.

    bitsandbytes' own int8 forward changes with the mode: on the CPU, eval runs LLM.int8
    (x quantized to int8, fp16 outlier columns) and training runs dequantize-then-matmul,
    about 0.5 % apart; on CUDA both run LLM.int8. The teacher (eval) and the student's base
    (training) would then be different functions. Pinned, the layer always computes
    `x (CB * SCB / 127)^T (+ bias)` through `_Int8DequantizedMatmul` (the weight decoded in
    the forward and again in the backward, never kept). Returns the number of layers pinned.
    """
    count = 0
    for module in model.modules():
        if is_linear8bit(module) and not isinstance(module, _pinned_int8_class()):
            module.__class__ = _pinned_int8_class()
            count += 1
    return count


class _Int8DequantizedMatmul(torch.autograd.Function):
    """y = x W^T (+ bias), W = CB * SCB / 127 decoded from the int8 layer in both passes."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return nn.functional.linear(x, dequantize_weight(layer, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ dequantize_weight(ctx.layer, grad_out.dtype), None, None


_PINNED_INT8 = None


def _pinned_int8_class():
    """`bnb.nn.Linear8bitLt` with its forward pinned (built once, when bitsandbytes is loaded)."""
    global _PINNED_INT8
    if _PINNED_INT8 is None:
        bnb = import_bitsandbytes()

        class PinnedLinear8bitLt(bnb.nn.Linear8bitLt):
            def forward(self, x):
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return _Int8DequantizedMatmul.apply(x, self, bias)

        _PINNED_INT8 = PinnedLinear8bitLt
    return _PINNED_INT8


def is_linear4bit(module) -> bool:
    bnb = _bnb_if_loaded()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_linear8bit(module) -> bool:
    bnb = _bnb_if_loaded()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_quantized_linear(module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    return is_linear4bit(module) or is_linear8bit(module)


def _bnb_if_loaded():
    """bitsandbytes when something imported it already, else None: no layer can be a
    bitsandbytes layer before then, and plain models never pay for its import."""
    import sys

    return sys.modules.get("bitsandbytes")


# ----------------------------------------------------------------------- identity


def quantization_identity(model) -> dict | None:
    """What changes the function a quantized base computes (for the model fingerprint):
    the method and its layout, not the compute dtype (a CPU fp32 and a GPU bf16 copy of
    one NF4 checkpoint are the same model, as for unquantized dtypes). None when plain."""
    for module in model.modules():
        if is_linear4bit(module):
            state = module.weight.quant_state
            return {"method": f"bitsandbytes-{state.quant_type}", "blocksize": int(state.blocksize),
                    "double_quant": bool(state.nested)}
        if is_linear8bit(module):
            return {"method": "bitsandbytes-int8", "threshold": float(module.state.threshold)}
    return None


def quantization_name(identity: dict | None) -> str:
    """"none", "nf4", "int8" (what --quantize would have to be) for an identity."""
    if not identity:
        return "none"
    return identity["method"].removeprefix("bitsandbytes-")


# ----------------------------------------------------------------- NF4 in plain torch


@dataclass(frozen=True)
class NestedAbsmax:
    """bitsandbytes' double quantization of the absmax: absmax[b] = code[q[b]] *
    scale[b // blocksize] + offset (8-bit blockwise, blocksize 256)."""

    quantized: torch.Tensor  # uint8 [blocks]
    code: torch.Tensor  # fp32 [256]
    scale: torch.Tensor  # fp32 [ceil(blocks / blocksize)]
    blocksize: int
    offset: float


@dataclass(frozen=True)
class NF4Weight:
    """A `Linear4bit` weight as the NF4 kernels read it: `packed` holds two 4-bit codes per
    byte (high nibble first) of the row-major `[d_out, d_in]` weight; element i uses
    `code[nibble] * absmax[i // blocksize]`, computed in fp32 and rounded to `dtype`."""

    packed: torch.Tensor  # uint8 [ceil(d_out * d_in / 2)]
    absmax: torch.Tensor  # fp32 [blocks], or the uint8 codes of `nested`
    code: torch.Tensor  # fp32 [16]
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype
    nested: NestedAbsmax | None = None


def nf4_weight(layer) -> NF4Weight:
    """The NF4Weight view of a `bnb.nn.Linear4bit` (no copy)."""
    state = layer.weight.quant_state
    if state.quant_type != "nf4":
        raise InputError(f"only NF4 4-bit bases are supported, this layer is {state.quant_type}")
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError("Linear4bit weight repacked for the CPU: disable_cpu_repacking was not applied")
    nested = None
    if state.nested:
        nested = NestedAbsmax(state.absmax, state.state2.code, state.state2.absmax,
                              int(state.state2.blocksize), float(state.offset))
    return NF4Weight(layer.weight.data.reshape(-1).view(torch.uint8), state.absmax if nested else state.absmax.float(),
                     state.code.float(), int(state.blocksize), tuple(state.shape), state.dtype, nested)


def block_absmax(weight: NF4Weight) -> torch.Tensor:
    """fp32 absmax per block (the double quantization undone as bitsandbytes does)."""
    nested = weight.nested
    if nested is None:
        return weight.absmax.float()
    scale = nested.scale.float().repeat_interleave(nested.blocksize)[: nested.quantized.numel()]
    return nested.code.float()[nested.quantized.long()] * scale + torch.tensor(nested.offset, dtype=torch.float32)


def dequantize_nf4(weight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense `[d_out, d_in]` weight of `weight` in `weight.dtype` (then `dtype`)."""
    n = math.prod(weight.shape)
    packed = weight.packed.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n]
    values = weight.code.float()[codes.long()]
    blocks = math.ceil(n / weight.blocksize)
    values = nn.functional.pad(values, (0, blocks * weight.blocksize - n)).view(blocks, weight.blocksize)
    dense = (values * block_absmax(weight)[:, None]).reshape(-1)[:n].reshape(weight.shape).to(weight.dtype)
    return dense if dtype is None else dense.to(dtype)


def dequantize_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of a bitsandbytes layer (what its own matmul multiplies by)."""
    if is_linear4bit(layer):
        return dequantize_nf4(nf4_weight(layer), dtype)
    cb, scb = _int8_state(layer)
    return (cb.float() * (scb.float()[:, None] / 127.0)).to(dtype)


def _int8_state(layer):
    """(int8 weight [d_out, d_in], row scales [d_out]): on the weight until the layer's
    first forward, then on `layer.state`."""
    if getattr(layer.weight, "SCB", None) is not None:
        return layer.weight.data, layer.weight.SCB
    return layer.state.CB, layer.state.SCB
