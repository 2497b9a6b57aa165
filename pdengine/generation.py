"""Batched, left-padded, seeded generation: what `qa` (questions, teacher answers) and
`evaluate` (greedy answers, judge verdicts) both use (docs/DESIGN.md, "Conventions").

Padding is built here from token ids, so the caller's tokenizer is never mutated (no change
to `padding_side` or `pad_token`). Every sampling knob is set explicitly, so a model's own
generation_config.json cannot change the method. Sampling is deterministic for a given seed
and batch size, and the caller's global RNG state is restored afterwards.

`ModelStageSettings` holds the settings every model-running stage shares (batch size, dtype,
progress); the stage configs (`qa.GenerateConfig`, `qa.AnswerConfig`, `evaluate.EvalConfig`)
extend it, so these defaults are written once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pdengine import prompts
from pdengine.config import POSITIVE, check_settings, setting
from pdengine.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelStageSettings:
    """Settings shared by generate, answer and eval."""

    batch_size: int = setting(16, "sequences generated together", check=POSITIVE)
    dtype: str | None = setting(None, "model dtype; auto = bfloat16 on CUDA, float32 on CPU", choices=DTYPES)
    progress: bool = setting(True, "show a progress bar on stderr")

    def __post_init__(self):
        check_settings(self)


def resolve_settings(cls, settings, overrides: dict):
    """`settings` (default: `cls()`) with a function's keyword overrides (`n_questions=3`);
    a bad value is an InputError, an unknown keyword a TypeError, as for any function."""
    settings = settings if settings is not None else cls()
    if not isinstance(settings, cls):
        raise TypeError(f"settings must be a {cls.__name__}, got {type(settings).__name__}")
    return dataclasses.replace(settings, **overrides)


def add_model_arguments(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """The flags a stage's pipeline wiring sets (not stage settings): model, device,
    attn-implementation, quantize (pdengine.loading's, the same on every command),
    documents, out, system."""
    from pdengine.loading import add_model_arguments as add_loading_arguments

    add_loading_arguments(parser)
    parser.add_argument("--documents", required=True, help="documents JSONL: {id, text}")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--system", default=None, help="system prompt (PromptFormat.system)")


def load_model(path, settings: ModelStageSettings, device=None, *, attn_implementation="auto", quantize=None):
    """(model, tokenizer) from a local directory, in the settings' dtype, with the
    attention implementation and quantization of `pdengine.loading.add_model_arguments`."""
    from pdengine.loading import load_model_and_tokenizer

    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    return load_model_and_tokenizer(path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                    quantize=quantize)


def load_options(args) -> dict:
    """The loading flags of a parsed command line, as `load_model`'s keywords."""
    return {"attn_implementation": getattr(args, "attn_implementation", "auto"),
            "quantize": getattr(args, "quantize", None)}


# ---------------------------------------------------------------- padding and stopping


def pad_token_id(tokenizer) -> int:
    """The id used for left padding: pad, else end of turn, else 0 (masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eot = prompts.end_of_turn_ids(tokenizer)
    return eot[0] if eot else 0


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` `[B, T]` with the prompts right-aligned."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end generation: the tokenizer's end of turn plus the model's own
    generation_config eos ids (Llama 3 instruct models stop on both <|eot_id|> and
    <|end_of_text|>)."""
    ids = list(prompts.end_of_turn_ids(tokenizer))
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for t in [extra] if isinstance(extra, int) else (extra or []):
        if int(t) not in ids:
            ids.append(int(t))
    return ids


def cut_at_stop(ids: list[int], stop: set, tokenizer) -> list[int]:
    """Generated ids up to (not including) the first stop token; trailing pads removed."""
    for i, t in enumerate(ids):
        if t in stop:
            ids = ids[:i]
            break
    return prompts.strip_end_of_turn(ids, tokenizer)


def _generation_config(tokenizer, stop, *, temperature, top_k, max_new_tokens):
    """Every sampling knob set explicitly, so a model's own generation_config.json
    (top_p, repetition penalty, ...) cannot silently change the method."""
    from transformers import GenerationConfig

    sample = temperature > 0
    # greedy: the sampling knobs stay unset (transformers warns about them otherwise)
    sampling = dict(temperature=float(temperature), top_k=int(top_k or 0), top_p=1.0) if sample else {}
    return GenerationConfig(
        do_sample=sample,
        **sampling,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        pad_token_id=pad_token_id(tokenizer),
        eos_token_id=stop or None,
    )


@contextmanager
def seeded(seed: int, device):
    """Seed torch's RNGs for a block and restore the caller's RNG state afterwards."""
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled or total == 0, file=sys.stderr)


# ---------------------------------------------------------------- generation


def check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")


def _check_sampling(temperature, top_k) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise InputError(f"top_k must be None or a non-negative integer, got {top_k!r}")


@dataclass(frozen=True)
class Generated:
    """One continuation: its new token ids (no stop token, no padding) and whether it
    ended on a stop token (False: `max_new_tokens` cut it off)."""

    ids: list[int]
    stopped: bool


def generate_ids(model, tokenizer, prompt_ids: list[list[int]], **kwargs) -> list[list[int]]:
    """Continue each prompt; returns the new token ids, cut at the first end of turn.
    Keyword arguments as `generate_sequences`."""
    return [g.ids for g in generate_sequences(model, tokenizer, prompt_ids, **kwargs)]


@torch.no_grad()
def generate_sequences(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = ModelStageSettings.batch_size,
    seed: int = 0,
    desc: str = "generate",
    progress: bool = True,
    ctx=None,
) -> list[Generated]:
    """Continue each prompt; returns one `Generated` per prompt, in the input order.

    temperature 0 = greedy. Prompts are sorted by length before batching (less padding).
    Batch b is sampled under seed `seed + b`, so the output is a function of (prompts,
    seed, batch_size). Under torchrun the batches are split round-robin over the ranks of
    `ctx` (default: the job's, `distributed.context()`; every rank passes the same prompts)
    and every rank returns all the results, equal to one process's whatever the number of
    ranks (docs/DESIGN.md, "Distributed"); `distributed.Context()` generates all batches here.
    """
    from pdengine import distributed

    check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    _check_sampling(temperature, top_k)
    if any(len(p) == 0 for p in prompt_ids):
        raise InputError("prompt_ids: every prompt needs at least one token")
    ctx = distributed.context() if ctx is None else ctx
    stop = stop_ids(model, tokenizer)
    config = _generation_config(tokenizer, stop, temperature=temperature, top_k=top_k,
                                max_new_tokens=max_new_tokens)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    mine = sum(len(batches[b]) for b in ctx.my_units(len(batches)))
    with progress_bar(mine, desc if not ctx.distributed else f"{desc} (rank 0 of {ctx.world_size})",
                      progress and ctx.is_main) as bar:
        def run_batch(b: int) -> list[Generated]:
            out = _generate_batch(model, tokenizer, [prompt_ids[i] for i in batches[b]], config, set(stop), seed + b)
            bar.update(len(out))
            return out

        # a cheap check that every rank got these prompts and settings (a digest of plain
        # numbers: Python's hash() of str, of None before 3.12, and of tensors differs per process)
        check = _inputs_digest(prompt_ids, seed, batch_size, temperature, top_k, max_new_tokens) \
            if ctx.distributed else None
        per_batch = distributed.map_units(ctx, len(batches), run_batch, check=check)
    results: list[Generated] = [Generated([], False) for _ in prompt_ids]
    for rows, generated in zip(batches, per_batch):
        for row, g in zip(rows, generated):
            results[row] = g
    return results


def _generate_batch(model, tokenizer, prompts_of_batch, config, stop_set: set, seed: int) -> list[Generated]:
    """One left-padded batch sampled under `seed`."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts_of_batch, config.pad_token_id, device)
    with seeded(seed, device):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [Generated(cut_at_stop(new, stop_set, tokenizer), any(t in stop_set for t in new))
            for new in out[:, ids.shape[1]:].cpu().tolist()]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def greedy_texts(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, batch_size: int,
                 desc: str, progress: bool) -> list[str]:
    """Greedy continuations of each prompt, decoded (evaluation answers and judge verdicts)."""
    ids = generate_ids(model, tokenizer, prompt_ids, temperature=0.0, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, desc=desc, progress=progress)
    return [decode(tokenizer, x) for x in ids]


def _inputs_digest(prompt_ids, *settings) -> str:
    import hashlib
    import json

    blob = json.dumps([[[int(t) for t in p] for p in prompt_ids], [float(x or 0) for x in settings]])
    return hashlib.sha256(blob.encode()).hexdigest()
