"""Loading a local Hugging Face causal LM and its tokenizer, with clear errors.

pdengine never reaches a model hub: paths must be local directories. Every command that
loads a model takes the same four flags (`add_model_arguments`: --model, --device,
--attn-implementation, --quantize) and loads through `load_from_args`, so the attention
implementation (docs/DESIGN.md, "Attention paths") and the quantized base
(docs/DESIGN.md, "Quantized base") are chosen the same way in every stage.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path

import torch

from pdengine.errors import InputError


def pick_device(device=None) -> torch.device:
    """The requested device, else CUDA when available, else CPU. Under torchrun each rank
    takes its own GPU: cuda:LOCAL_RANK for no device or a plain "cuda" (another index is refused)."""
    from pdengine import distributed

    ctx = distributed.context()
    if device is not None:
        device = torch.device(device)
        if ctx.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", ctx.local_rank)
        if ctx.distributed and device.type == "cuda" and device.index != ctx.local_rank:
            # every rank on one GPU: NCCL fails later and obscurely (or N models share it)
            raise InputError(f"--device {device} under torchrun: each rank uses its own GPU "
                             f"(cuda:LOCAL_RANK); pass --device cuda or no --device")
        return device
    if ctx.distributed:
        return ctx.device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise InputError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{config_file}: not a valid JSON config ({e})") from None
    archs = (config.get("architectures") or []) if isinstance(config, dict) else None
    if archs is None:
        raise InputError(f"{config_file}: expected a JSON object")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise InputError(f"{path} holds a {', '.join(archs)}, not a causal LM (*ForCausalLM)")


def load_model_and_tokenizer(path, *, dtype=None, device=None, attn_implementation="auto", quantize=None,
                             training: bool = False, keep_on_cpu: bool = False):
    """Load `(model, tokenizer)` from a local directory, in eval mode, on `device`.

    dtype defaults to bfloat16 on CUDA and float32 on CPU. `attn_implementation` is one of
    `attention.CHOICES` ("auto" picks the best available on the device, for a backward pass
    when `training`); the one chosen is printed once on stderr and is the model's
    `config._attn_implementation`. `quantize` ("nf4", "int8", None/"none") loads the base
    through bitsandbytes (pdengine/quantize.py); an InputError line when it cannot load.
    `keep_on_cpu`: dtype and attention chosen for `device`, the weights left on the CPU, for
    FSDP, which moves each layer to the device as it shards it (a base larger than one GPU).
    Raises InputError when the directory is missing, is not a model directory, does not
    hold a causal LM, or holds pickled weights (`pytorch_model.bin`) that torch's
    `weights_only` loader refuses: a pickle can run code, so it is never loaded unsafely.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdengine import attention, quantize as quantization

    path = Path(path)
    _check_model_dir(path)
    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    implementation = attention.choose(attn_implementation, device, training=training)
    if keep_on_cpu and quantization.parse_quantize(quantize) is not None:
        raise InputError("a quantized base is placed by bitsandbytes as it loads: it cannot stay on the CPU")
    extra = quantization.from_pretrained_kwargs(path, quantize, device)  # before any weight is read
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     attn_implementation=implementation, **extra)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: the pickled weights (pytorch_model.bin) hold objects that are not plain "
                         f"tensors, refused by torch.load(weights_only=True); convert the model to "
                         f"safetensors from a source you trust") from None
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise InputError(f"{path}: unreadable safetensors weights ({_first_line(e)}); "
                         f"the file is truncated or corrupt") from None
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"cannot load a causal LM from {path}: {_first_line(e)}") from None
    _announce_attention(model)
    if keep_on_cpu:
        return model.eval(), tokenizer
    return quantization.prepare_loaded_model(model, device).eval(), tokenizer


_ANNOUNCED: set[str] = set()  # implementations already printed by this process


def _announce_attention(model) -> None:
    """Print the attention implementation once per process (eval loads one model per
    adapter: one line is enough), and under torchrun only on rank 0."""
    name = attention_implementation_of(model)
    if name not in _ANNOUNCED and os.environ.get("RANK", "0") == "0":
        _ANNOUNCED.add(name)
        print(f"pdengine: attention implementation {name}", file=sys.stderr, flush=True)


def attention_implementation_of(model) -> str:
    """The implementation a loaded model runs with (what run.json and manifests record)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


# ---------------------------------------------------------------- the flags of every stage


def add_model_arguments(parser: argparse.ArgumentParser, *, model_required: bool = True,
                        model_help: str = "local Hugging Face causal-LM directory") -> None:
    """--model, --device, --attn-implementation, --quantize: the same on every command
    that loads a model (read back by `load_from_args`)."""
    from pdengine.attention import CHOICES
    from pdengine.quantize import QUANTIZE_CHOICES

    parser.add_argument("--model", required=model_required, default=None, help=model_help)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--attn-implementation", default="auto", choices=CHOICES,
                        help="attention kernels of the model (default auto: flash_attention_2 on CUDA when "
                             "flash-attn is installed, else sdpa); the choice is printed and recorded")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="load the frozen base quantized by bitsandbytes (QLoRA; default none)")


def load_from_args(args, *, training: bool = False, path=None, dtype=None, keep_on_cpu: bool = False):
    """`(model, tokenizer)` from the flags of `add_model_arguments` (`path` overrides
    --model, e.g. a training run's recorded model)."""
    return load_model_and_tokenizer(path if path is not None else args.model, dtype=dtype,
                                    device=getattr(args, "device", None),
                                    attn_implementation=getattr(args, "attn_implementation", "auto"),
                                    quantize=getattr(args, "quantize", None), training=training,
                                    keep_on_cpu=keep_on_cpu)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_tokenizer_and_config(path):
    """`(tokenizer, config)` of a local model directory without its weights: what a
    pre-flight check (context length, vocabulary) needs before any stage loads the model."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    _check_model_dir(path)
    try:
        return (AutoTokenizer.from_pretrained(path, local_files_only=True),
                AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer and config of {path}: {_first_line(e)}") from None
