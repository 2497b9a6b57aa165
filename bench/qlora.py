"""QLoRA: one LoRA training step on a dense vs NF4 vs int8 frozen base, in one run.

For each base (fp32 on CPU / bf16 on CUDA, NF4 with double quantization, int8) the same
random Llama-style model (same seed) gets the same LoRA (r, all seven projections), is
quantized in memory exactly as loading with `--quantize` would (`pdengine.qlora.
quantize_model`), and runs forward + backward of the fused top-k KL loss
(`pdengine.train.compute_loss`, loss=pd) with activation checkpointing. Reported:
- resident bytes of the model (all of it, and the linear layers of the base alone),
- peak memory the step adds (bench/common.py: CUDA allocator / CPU VmHWM), step time,
- for NF4: the LoRA gradients against a float32 twin holding the dequantized weights
  (the issue's bound: relative error <= 1e-5),
- `predict_peak`: a formula for the peak of a step (resident + step), printed beside the
  measured figure of every row, then applied to Llama-3-8B (seq 2048, r 64, fused loss,
  checkpointing, Adam state) in bf16 and NF4, against a 24 GB card.

Presets: `cpu` (d 1024, 4 layers, V 32000, seq 256: feasible on a few cores), `cpu-small`
(the same at half width, a second point for the formula), `llama-1b` (the issue's shape:
d 2048, 16 layers, V 128256, seq 1024; GPU).

    python bench/qlora.py --preset cpu
    python bench/qlora.py --preset llama-1b --save
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_save_flag, peak_memory, print_table, save_results, time_round_robin  # noqa: E402
from train_step import make_batch, step_fn  # noqa: E402

import pdengine  # noqa: E402
from pdengine import qlora, quantize  # noqa: E402
from pdengine.train import TrainConfig, compute_loss  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
K = 64  # teacher top-k
PRESETS = {
    # name: (LlamaConfig kwargs, dense dtype, seq, batch, LoRA rank)
    "cpu": (dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=4), torch.float32, 256, 1, 16),
    "cpu-small": (dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2), torch.float32, 256, 1, 16),
    "llama-1b": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                      rope_theta=500000.0), torch.bfloat16, 1024, 1, 64),
}
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)


# ----------------------------------------------------------------------- the formula


def _linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(d_out, d_in) of every base linear layer of a Llama decoder (the quantized ones)."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    d_kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = [(d, d), (d_kv, d), (d_kv, d), (d, d), (f, d), (f, d), (d, f)]
    return per_layer * cfg["num_hidden_layers"]


def layer_bytes(base: str, d_out: int, d_in: int, dense_bytes: int) -> int:
    """Resident bytes of one base linear. NF4: half a byte per weight, a uint8 absmax per
    64 values, an fp32 scale per 256 blocks, the 16- and 256-entry fp32 code tables
    (double quantization); int8: a byte per weight and an fp32 scale per row."""
    n = d_out * d_in
    if base == "nf4":
        blocks = -(-n // 64)
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256)
    if base == "int8":
        return n + 4 * d_out
    return n * dense_bytes


def predict_peak(cfg: dict, base: str, dense_bytes: int, tokens: int, rank: int, *, answer_tokens: int,
                 adam: bool = False, dense_weight_copy: bool = True) -> dict:
    """Peak bytes of one LoRA step with activation checkpointing (resident model + step).

    resident   base linears (layer_bytes) + embeddings and lm_head (dense, unquantized)
               + LoRA factors in fp32 (+ Adam's two fp32 moments with `adam`)
    step       LoRA gradients (fp32)
               + checkpointed layer inputs: layers x tokens x d x act
               + one decoder layer recomputed in the backward: its saved activations
                 (7 d + 3 d_kv + 4 ffn per token) and as much again for their gradients
               + the fused loss: the final hidden state and its gradient in fp32, top-k
                 rows of ids (int64) and log-probs (fp32) per answer token
               + with a quantized base on the CPU path (`dense_weight_copy`), one layer's
                 dequantized weight at a time (the largest)
    act = the dense dtype's bytes (activations are in the compute dtype).
    """
    d, f, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    d_kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = _linear_shapes(cfg)
    base_bytes = sum(layer_bytes(base, o, i, dense_bytes) for o, i in shapes)
    heads = vocab * d * dense_bytes * (1 if cfg.get("tie_word_embeddings") else 2)
    lora = sum(rank * (o + i) for o, i in shapes) * 4
    resident = base_bytes + heads + lora * (3 if adam else 1)
    act = dense_bytes
    step = (lora + layers * tokens * d * act + 2 * tokens * (7 * d + 3 * d_kv + 4 * f) * act
            + 2 * tokens * d * 4 + answer_tokens * K * 12)
    if base != "dense" and dense_weight_copy:
        step += max(o * i for o, i in shapes) * act
    return {"resident": resident, "step": step, "total": resident + step, "base_linears": base_bytes}


# ------------------------------------------------------------------------ measuring


def _tensors_of(module) -> list:
    """The tensors a module holds itself: parameters, buffers, bitsandbytes' quant state."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    weight = getattr(module, "weight", None) if not list(module.children()) else None
    state = getattr(weight, "quant_state", None)
    if state is not None:
        tensors += [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
    if getattr(weight, "SCB", None) is not None:
        tensors.append(weight.SCB)
    return tensors


def resident_bytes(model) -> tuple[int, int]:
    """(bytes of every tensor the model holds, bytes of its base linears, quantized or not),
    each storage counted once."""
    seen, total, linears = set(), 0, 0
    for name, module in model.named_modules():
        own = 0
        for t in _tensors_of(module):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                own += t.numel() * t.element_size()
        total += own
        if name.endswith(".base_layer"):
            linears += own
    return total, linears


def build(preset: str, base: str, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs, dtype, _seq, _batch, rank = PRESETS[preset]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**kwargs, max_position_embeddings=4096, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    pdengine.add_lora(model, rank, 2 * rank, target_modules=TARGETS)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give lora_A a gradient to compare
            torch.nn.init.normal_(p, std=0.02)
    if base != "dense":
        qlora.quantize_model(model, base)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _loss_fn(model, rank):
    cfg = TrainConfig(temperature=2.0, lora_r=rank, lora_alpha=2 * rank)
    return lambda batch: compute_loss(model, batch, cfg, validate=False)


def _lora_grads(model, loss_fn, batch) -> dict:
    model.zero_grad(set_to_none=True)
    loss_fn(batch).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def nf4_gradient_error(model, preset, device, loss_fn, batch) -> float:
    """Max relative error of the NF4 model's LoRA gradients against a dense model holding
    its dequantized weights (compute dtype fp32 on CPU)."""
    twin = build(preset, "dense", device)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, qlora.QuantizedLoRALinear)}
    with torch.no_grad():
        for name, layer in layers.items():
            twin.get_submodule(name).base_layer.weight.copy_(quantize.dequantize_weight(layer.base_layer,
                                                                                        torch.float32))
    want = _lora_grads(twin, _loss_fn(twin, PRESETS[preset][4]), batch)
    got = _lora_grads(model, loss_fn, batch)
    del twin
    return max(((got[n].double() - want[n].double()).abs().max() / want[n].double().abs().max()).item()
               for n in want)


def _exact_cpu_memory_accounting() -> None:
    """Re-run this process with glibc serving every allocation of 64 KiB or more by mmap
    and unmapping it on free (a fixed threshold turns off glibc's adaptive one, which
    otherwise keeps freed tensors resident and lets fragmentation inflate VmHWM): the
    resident set then follows the live tensors, and the CPU step peaks are comparable."""
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _release_freed_memory() -> None:
    """Hand the warm-up's freed heap back to the OS (glibc keeps it otherwise), so that the
    measured step's allocations raise the resident set again and VmHWM sees them."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the CPU figure is a lower bound


def measure(preset: str, bases: list[str], device, reps: int) -> list[dict]:
    """One row per base: resident bytes and step peak measured one model at a time, step
    times round-robin (A B C A B C ...) so a slow stretch of a shared machine hits all."""
    kwargs, dtype, seq, batch_size, rank = PRESETS[preset]
    batch = make_batch(kwargs["vocab_size"], batch_size, seq, 0.25, device)
    models, steps, rows = {}, {}, []
    for base in bases:
        models[base] = build(preset, base, device)
        loss_fn = _loss_fn(models[base], rank)
        steps[base] = step_fn(models[base], loss_fn, batch)
        steps[base]()  # warm-up (lazy initialisation is not the step's memory)
        _release_freed_memory()
        peak = peak_memory(steps[base])
        total, linears = resident_bytes(models[base])
        pred = predict_peak(kwargs, base, torch.finfo(dtype).bits // 8, batch_size * seq, rank,
                            answer_tokens=batch["target_positions"].numel(), dense_weight_copy=device.type == "cpu")
        row = {"preset": preset, "base": base if base != "dense" else str(dtype).removeprefix("torch."),
               "resident_MB": total / 2**20, "base_linears_MB": linears / 2**20, "step_peak_MB": peak / 2**20,
               "measured_total_MB": (total + peak) / 2**20, "predicted_total_MB": pred["total"] / 2**20,
               "predicted_base_linears_MB": pred["base_linears"] / 2**20}
        if base == "nf4" and device.type == "cpu":
            row["nf4_grad_rel_err"] = nf4_gradient_error(models[base], preset, device, loss_fn, batch)
        rows.append(row)
    timings = time_round_robin(steps, warmup=0, reps=reps)
    for row, base in zip(rows, bases):
        t = timings[base]
        row.update(step_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"])
    del models, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def eight_b_estimate() -> list[dict]:
    rows = []
    for base in ("dense", "nf4"):
        pred = predict_peak(LLAMA3_8B, base, 2, 2048, 64, answer_tokens=512, adam=True, dense_weight_copy=False)
        rows.append({"model": "Llama-3-8B", "base": "bf16" if base == "dense" else "nf4", "seq": 2048, "r": 64,
                     "resident_GB": pred["resident"] / 1e9, "step_GB": pred["step"] / 1e9,
                     "peak_GB": pred["total"] / 1e9, "fits_24GB": pred["total"] < 24e9})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=["cpu-small", "cpu"])
    parser.add_argument("--bases", nargs="+", default=["dense", "nf4", "int8"], choices=["dense", "nf4", "int8"])
    parser.add_argument("--reps", type=int, default=3)
    add_save_flag(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and argv is None:
        _exact_cpu_memory_accounting()
    quantize.import_bitsandbytes()
    rows = [row for preset in args.preset for row in measure(preset, args.bases, device, args.reps)]
    print_table(rows, ["preset", "base", "resident_MB", "base_linears_MB", "predicted_base_linears_MB",
                       "step_peak_MB", "measured_total_MB", "predicted_total_MB", "step_ms", "nf4_grad_rel_err"])
    for preset in args.preset:
        dense = next((r for r in rows if r["preset"] == preset and r["base"] not in ("nf4", "int8")), None)
        for r in rows:
            if dense and r["preset"] == preset and r is not dense:
                print(f"{preset} {r['base']}: base linears {dense['base_linears_MB'] / r['base_linears_MB']:.2f}x "
                      f"smaller, whole model {dense['resident_MB'] / r['resident_MB']:.2f}x, "
                      f"step {r['step_ms'] / dense['step_ms']:.2f}x the time")
    estimate = eight_b_estimate()
    print_table(estimate, ["model", "base", "seq", "r", "resident_GB", "step_GB", "peak_GB", "fits_24GB"])
    save_results("qlora", rows + estimate, save=args.save)


if __name__ == "__main__":
    main()
