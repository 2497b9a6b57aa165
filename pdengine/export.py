"""`pdengine export --merge`: a LoRA student as one full model any tool loads.

`export_merged(model_dir, adapter_dir, out_dir)` loads the base, adds the adapter
(`pdengine.lora.load_adapter`), folds it into the base weights (`pdengine.lora.merge_adapter`)
and writes a Hugging Face directory: safetensors weights, config, generation config and
the tokenizer, so `AutoModelForCausalLM.from_pretrained(out_dir)` gives the adapter's
outputs with no PEFT and no pdengine.

Tied input/output embeddings: PEFT warns that an adapter on tied modules complicates
merging (its in-place merge of a LoRA on the embeddings or the lm_head writes into the one
shared matrix, so the other side changes too). pdengine unties instead: the merged side gets its own matrix, the
config says `tie_word_embeddings: false`, and the export writes both matrices (the
directory is one embedding matrix larger; outputs are the adapter's exactly).

Refused (InputError): a pre-quantized base checkpoint (GPTQ, AWQ, bitsandbytes: there is
no full-precision weight to add the LoRA to) and an adapter trained on a quantized base
(`quantize: nf4|int8` in its run.json): its LoRA learned to correct the quantized weights,
so adding it to the full-precision ones gives another model than the one trained
(docs/DESIGN.md, "Quantized base").

Before anything is written, the merged model's logits on a probe are compared with the
adapted model's; a mismatch is a bug and keeps its traceback. The directory is written
under a temporary name and renamed at the end: a killed export leaves no half model.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from pdengine.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max |merged - adapted| logit difference accepted, relative to the logits' scale: float32
# merges add rounding only; half precision rounds every merged weight once.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
PROBE_TOKENS = 16


# ---------------------------------------------------------------- refusals


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def check_not_quantized(model_dir: Path, adapter_dir: Path) -> None:
    """InputError for a pre-quantized base or an adapter trained on a quantized base."""
    config_file = model_dir / "config.json"
    if config_file.is_file():
        method = _read_json(config_file).get("quantization_config")
        if method:
            kind = method.get("quant_method", "quantized") if isinstance(method, dict) else "quantized"
            raise InputError(f"{model_dir} is a {kind} checkpoint: a merged export needs the full-precision "
                             "base (export from the unquantized model, or serve the adapter with this base)")
    quantize, source = _trained_quantization(adapter_dir)
    if quantize:
        raise InputError(f"{adapter_dir} was trained on a {quantize}-quantized base ({source}): merged "
                         "into the full-precision weights it would be another model; serve the adapter "
                         "with the quantized base instead")


def _trained_quantization(adapter_dir: Path) -> tuple[str | None, Path | None]:
    """(quantization, the file that says so) of the base an adapter was trained on, from
    the training run's run.json: its `quantize` setting, else the model config its teacher
    cache recorded (a bitsandbytes load puts `quantization_config` there). (None, None)
    for a plain base or an adapter without its run directory."""
    for run_file in (adapter_dir / "run.json", adapter_dir.parent / "run.json"):
        if not run_file.is_file():
            continue
        run = _read_json(run_file)
        quantize = (run.get("config") or {}).get("quantize")
        if quantize not in (None, "none"):
            return str(quantize), run_file
        cache = run.get("cache") or {}
        manifest = Path(str(cache.get("path", ""))) / "manifest.json" if isinstance(cache, dict) else None
        if manifest is not None and manifest.is_file():
            method = ((_read_json(manifest).get("model") or {}).get("config") or {}).get("quantization_config")
            if method:
                return _quantization_kind(method), manifest
        return None, None
    return None, None


def _quantization_kind(method) -> str:
    """"nf4" / "int8" for a bitsandbytes quantization_config, else its quant_method."""
    if not isinstance(method, dict):
        return "quantized"
    if method.get("load_in_4bit"):
        return str(method.get("bnb_4bit_quant_type") or "4-bit")
    if method.get("load_in_8bit"):
        return "int8"
    return str(method.get("quant_method") or "quantized")


def _check_out(out_dir: Path, force: bool) -> None:
    """An empty or absent --out; with `force`, an earlier export (never other files)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file, not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise InputError(f"--out {out_dir} exists and is not empty; pass --force to replace it")
        if not (out_dir / "pdengine_export.json").is_file():
            raise InputError(f"--out {out_dir} holds files that are not a pdengine export; refusing to replace "
                             "them even with --force")


def _saved_dtype(model_dir: Path, dtype: str | None) -> torch.dtype:
    """The dtype to merge and save in: `dtype`, else the base checkpoint's own."""
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise InputError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    config = _read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    stored = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(stored, torch.float32)


# ---------------------------------------------------------------- tied embeddings


def _tied(model) -> bool:
    """Whether the input and output embeddings are one matrix (LoRA-wrapped or not)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None:
        return False
    return head.weight is embed.weight


def _probe_logits(model, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=generator).to(model.device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def _check_same(adapted: torch.Tensor, merged: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """Max relative logit difference; AssertionError (a bug, with traceback) above tolerance."""
    scale = adapted.abs().max().clamp_min(1e-6)
    diff = float((adapted - merged).abs().max() / scale)
    if diff > TOLERANCE[dtype]:
        raise AssertionError(f"{what}: logits differ from the adapted model's by {diff:.2e} of their scale "
                             f"(tolerance {TOLERANCE[dtype]:.0e}); this is a pdengine bug")
    return diff


# ---------------------------------------------------------------- export


def export_merged(model_dir, adapter_dir, out_dir, *, dtype: str | None = None, device=None,
                  force: bool = False, log=None) -> dict:
    """Write base + adapter merged into one Hugging Face model directory at `out_dir`.

    dtype: the saved weights' dtype (default: the base checkpoint's own). Returns a summary
    (paths, dtype, whether embeddings were untied, the probe's logit difference), also
    written to `out_dir/pdengine_export.json`.
    """
    from pdengine.loading import load_model_and_tokenizer
    from pdengine.lora import load_adapter, lora_modules, merge_adapter

    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    check_not_quantized(model_dir, adapter_dir)
    _check_out(out_dir, force)
    save_dtype = _saved_dtype(model_dir, dtype)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=save_dtype, device=device or "cpu")
    was_tied = _tied(model)
    load_adapter(model, adapter_dir)
    adapted_names = sorted(lora_modules(model))
    vocab = model.get_input_embeddings().weight.shape[0]
    adapted = _probe_logits(model, vocab)
    merge_adapter(model)  # unties a tied pair when only one side carries the LoRA
    untied = was_tied and not _tied(model)
    difference = _check_same(adapted, _probe_logits(model, vocab), save_dtype, "the merged model")
    summary = {"base": str(model_dir), "adapter": str(adapter_dir), "dtype": str(save_dtype).replace("torch.", ""),
               "merged_modules": len(adapted_names), "untied_embeddings": untied,
               "probe_max_relative_logit_difference": difference}
    _write(model, tokenizer, out_dir, summary)
    log(f"export: merged {len(adapted_names)} LoRA modules of {adapter_dir} into {model_dir} -> {out_dir} "
        f"({summary['dtype']}{', embeddings untied' if untied else ''})")
    return summary


def _write(model, tokenizer, out_dir: Path, summary: dict) -> None:
    """save_pretrained into a temporary sibling, then rename it into place."""
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # safetensors (transformers' only format since v5)
    tokenizer.save_pretrained(partial)
    (partial / "pdengine_export.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an empty directory or, with force, an earlier export
    partial.rename(out_dir)


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """Options of `pdengine export`."""
    parser.add_argument("--merge", action="store_true", required=True,
                        help="write base + adapter merged into one full model (the only export so far)")
    parser.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="the adapter directory (PEFT format, e.g. train/adapter)")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="saved weights' dtype (default: auto = the base checkpoint's)")
    parser.add_argument("--device", default=None, help="where to merge (default: cpu)")
    parser.add_argument("--force", action="store_true", help="replace an existing export at --out")


def run(args) -> int:
    """`pdengine export --merge --model DIR --adapter DIR --out DIR`."""
    export_merged(args.model, args.adapter, args.out, dtype=args.dtype, device=args.device, force=args.force)
    return 0


__all__ = ["export_merged", "check_not_quantized", "add_arguments", "run"]
