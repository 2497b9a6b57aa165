"""Training step and epoch: pdengine vs Hugging Face + PEFT with materialized logits.

Two measurements, baselines in the same run, random-initialised models (no weights):

1. Step: one forward + backward of a LoRA student on the same batch of B sequences
   (answer tokens = the last `--answer-frac` of each), loss = forward KL over the
   teacher's top-k at temperature 2 (tail mode).
   - `pdengine`: pdengine LoRA (fused lora_linear), model body only, the fused
     `linear_topk_kl` on the answer positions: no `[tokens, vocab]` logits.
   - `hf_peft`: PEFT LoRA, `model(input_ids).logits` (all positions, as the original code
     does), log-softmax and the same KL on materialized logits.
   Median/p20/p80 step time, peak memory added by the step, and (CUDA) the largest B that
   fits for each, found by doubling B until out of memory. The two losses are compared
   (same weights, same batch) as a correctness check.
2. Epoch: `pdengine.train` for one epoch on the same QA items with `loss=pd` (teacher
   top-k computed once beforehand; its time is reported separately) vs
   `loss=online_kl` (the teacher forward over document + question + answer at every
   step, full-vocabulary KL).

3. `--packed` (issue 13): one packed row of T tokens (sequences of 128 end to end), forward +
   backward through the model body, the old way (a dense `[T, T]` block mask built by
   pdengine) against the new (restarted `position_ids`, no mask: the model's attention
   separates the sequences), at T = 2048 and 8192; a fresh process per measurement.

Presets: `cpu` (a small Llama, fp32), `llama-1b` (Llama-3.2-1B shapes) and `llama-8b`
(Llama-3-8B shapes), bf16, sequence 1024: GPU only.

    python bench/train_step.py --preset cpu
    python bench/train_step.py --preset llama-1b --seq 1024 --batch 4
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_save_flag, environment, peak_memory, print_table, save_results, time_fn, time_round_robin  # noqa: E402

import pdengine  # noqa: E402
from pdengine import modeling, reference  # noqa: E402
from pdengine.train import TrainConfig, compute_loss, train  # noqa: E402

PRESETS = {
    # name: (LlamaConfig kwargs, dtype, seq, batch, lora rank)
    "cpu": (dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4), torch.float32, 256, 4, 16),
    "llama-1b": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                      rope_theta=500000.0), torch.bfloat16, 1024, 4, 64),
    "llama-8b": (dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
                 torch.bfloat16, 1024, 1, 64),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
K, TEMPERATURE = 64, 2.0


def build_model(preset, device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs, dtype, *_ = PRESETS[preset]
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of an 8B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**kwargs, max_position_embeddings=4096,
                                                 attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    return model.train()


def make_batch(vocab, batch, seq, answer_frac, device, seed=0):
    """B rows of one sequence each; targets = the last answer_frac of every row."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    n_ans = max(1, int(seq * answer_frac))
    rows = torch.arange(batch)[:, None] * seq
    targets = (rows + torch.arange(seq - 1 - n_ans, seq - 1)[None]).reshape(-1)
    # Teacher top-k without a [M, V] tensor (large batches in the max-batch search): K
    # distinct ids per row, log-probs of a random distribution over K + 1 outcomes (the
    # last one is the mass outside the top-k), sorted descending.
    m = targets.numel()
    ids = (torch.randint(0, vocab, (m, 1), generator=gen) + torch.arange(K)) % vocab
    lp = torch.log_softmax(torch.randn(m, K + 1, generator=gen) * 3, -1)[:, :K].sort(-1, descending=True).values
    out = {"input_ids": input_ids, "target_positions": targets, "labels": input_ids.reshape(-1)[targets + 1],
           "topk_ids": ids, "topk_logprobs": lp}
    return {k: v.to(device) for k, v in out.items()}


def pdengine_setup(preset, device, rank):
    model = build_model(preset, device)
    pdengine.add_lora(model, rank, 2 * rank, target_modules=TARGETS)
    cfg = TrainConfig(temperature=TEMPERATURE, lora_r=rank, lora_alpha=2 * rank)

    def loss_fn(batch):
        return compute_loss(model, batch, cfg, validate=False)

    return model, loss_fn


def hf_peft_setup(preset, device, rank):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(preset, device),
                           LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS))

    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"]).logits  # [B, S, V]: what the original does
        selected = logits.reshape(-1, logits.shape[-1])[batch["target_positions"]].float()
        return topk_kl_on_logits(selected, batch["topk_ids"], batch["topk_logprobs"])

    return model, loss_fn


def topk_kl_on_logits(logits, ids, lp):
    """The fused op's tail-mode KL, on materialized logits (docs/DESIGN.md, "Fused loss")."""
    logq = torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(1, ids)
    p = lp.exp()
    tail_t = (1 - p.sum(-1)).clamp(min=0)
    tail_s = (1 - logq.exp().sum(-1)).clamp(min=reference.TAIL_MASS_EPS)
    loss = (p * (lp - logq)).sum(-1) + torch.xlogy(tail_t, tail_t) - tail_t * tail_s.log()
    return loss.mean()


def step_fn(model, loss_fn, batch):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = loss_fn(batch)
        loss.backward()
        for p in params:
            p.grad = None
        return loss

    return step


def free(*objs):
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(setup, preset, device, rank, seq, answer_frac, limit=256):
    """Largest B (doubling) whose step runs without CUDA OOM; None on CPU."""
    if device.type != "cuda":
        return None
    model, loss_fn = setup(preset, device, rank)
    vocab = PRESETS[preset][0]["vocab_size"]
    best, b = 0, 1
    while b <= limit:
        try:
            step_fn(model, loss_fn, make_batch(vocab, b, seq, answer_frac, device))()
            torch.cuda.synchronize()
            best, b = b, b * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    free(model, loss_fn)
    return best


SETUPS = {"pdengine": pdengine_setup, "hf_peft": hf_peft_setup}


def step_shape(args):
    _, _, seq0, batch0, rank0 = PRESETS[args.preset]
    return args.seq or seq0, args.batch or batch0, args.rank or rank0


def measure_step(args, device, name) -> dict:
    """One path's step: time, peak memory, largest batch. Runs in its own process, so
    the CPU peak (resident set) is not hidden by memory the other path freed."""
    seq, batch, rank = step_shape(args)
    vocab = PRESETS[args.preset][0]["vocab_size"]
    model, loss_fn = SETUPS[name](args.preset, device, rank)
    data = make_batch(vocab, batch, seq, args.answer_frac, device)
    step = step_fn(model, loss_fn, data)
    loss = float(step().detach())  # warm-up, and the cross-path correctness check
    timing = time_fn(step, warmup=1, reps=args.reps)
    peak = peak_memory(step)
    free(model, loss_fn, step)
    fits = largest_batch(SETUPS[name], args.preset, device, rank, seq, args.answer_frac) if args.find_max else None
    return {"bench": "step", "path": name, "preset": args.preset, "batch": batch, "seq": seq,
            "answer_tokens": int(data["target_positions"].numel()), "rank": rank, "k": K, "loss": loss,
            **timing, "peak_mib": peak / 2**20, "max_batch": fits,
            "tokens_per_s": batch * seq / (timing["median_ms"] / 1e3)}


def run_worker(argv, name) -> dict:
    """This script in a fresh process measuring one path; its last stdout line is JSON."""
    import json
    import subprocess

    cmd = [sys.executable, __file__, *argv, "--worker", name]
    # glibc keeps freed small blocks mapped, so a step after the warm-up reuses them and
    # the resident-set peak (CPU) misses them; serving blocks >= 64 KiB with mmap makes
    # the peak follow live memory. Both paths run under the same setting.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def interleaved_times(args, device) -> dict:
    """Step times of both paths in one process, alternating rep by rep, so the load of a
    shared CPU hits both alike (the per-process times are kept as `*_own_process`)."""
    seq, batch, rank = step_shape(args)
    vocab = PRESETS[args.preset][0]["vocab_size"]
    data = make_batch(vocab, batch, seq, args.answer_frac, device)
    steps = {name: step_fn(*setup(args.preset, device, rank), data) for name, setup in SETUPS.items()}
    times = time_round_robin(steps, warmup=1, reps=args.reps)
    free(steps)
    return {name: t["median_ms"] for name, t in times.items()}


def bench_step(args, argv, device) -> list[dict]:
    rows = [run_worker(argv, name) for name in SETUPS]
    if device.type == "cpu":
        for row, (name, median) in zip(rows, interleaved_times(args, device).items()):
            for key in ("median_ms", "p20_ms", "p80_ms"):
                row[key + "_own_process"] = row.pop(key)
            row["median_ms"] = median
            row["tokens_per_s"] = row["batch"] * row["seq"] / (median / 1e3)
    pd, base = rows
    pd["time_ratio_vs_hf"] = pd["median_ms"] / base["median_ms"]
    pd["memory_ratio_vs_hf"] = pd["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None
    if pd["max_batch"] and base["max_batch"]:
        pd["max_batch_ratio_vs_hf"] = pd["max_batch"] / base["max_batch"]
    rel = abs(pd["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-6)
    tol = 2e-2 if PRESETS[args.preset][1] == torch.bfloat16 else 1e-3
    print(f"loss pdengine {pd['loss']:.5f}  hf_peft {base['loss']:.5f}  (rel. diff {rel:.2e})")
    if rel > tol:
        raise SystemExit(f"the two paths disagree on the loss (rel. diff {rel:.2e} > {tol})")
    return rows


def epoch_items(model, n_items, doc_len, q_len, ans_len, device, seed=0):
    """QA items whose teacher sees a random document; top-k by pdengine.teacher_topk."""
    vocab = modeling.output_layer(model).weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    items = []
    with torch.no_grad():
        for _ in range(n_items):
            doc, q, ans = (torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (doc_len, q_len, ans_len))
            teacher, start = doc + q + ans, doc_len + q_len
            hidden = modeling.hidden_states(model, torch.tensor([teacher], device=device))[0]
            rows = hidden[start - 1 : start - 1 + ans_len]
            ids, lp = pdengine.teacher_topk(rows, modeling.output_layer(model).weight, K, TEMPERATURE)
            items.append({"teacher_input_ids": teacher, "student_input_ids": q + ans,
                          "answer_start_teacher": start, "answer_start_student": q_len,
                          "topk_ids": ids.cpu(), "topk_logprobs": lp.cpu()})
    return items


def bench_epoch(args, device) -> list[dict]:
    import tempfile

    rank = args.rank or PRESETS[args.preset][4]
    model = build_model(args.preset, device).eval()
    started = time.perf_counter()
    items = epoch_items(model, args.epoch_items, args.doc_len, 32, args.answer_len, device)
    teacher_s = time.perf_counter() - started
    free(model)
    seconds = {"pd": [], "online_kl": []}
    steps = {}
    for _ in range(args.epoch_reps):  # alternate the two, so load changes hit both alike
        for loss in seconds:
            model = build_model(args.preset, device)
            cfg = TrainConfig(loss=loss, epochs=1, lr=1e-4, lora_r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                              batch_tokens=args.epoch_batch_tokens, temperature=TEMPERATURE, progress=False,
                              save_every=0)
            with tempfile.TemporaryDirectory() as out:
                result = train(model, None, items, out, cfg)
            seconds[loss].append(result["seconds"])
            steps[loss] = result["steps"]
            free(model)
    rows = [{"bench": "epoch", "path": loss, "preset": args.preset, "items": len(items), "doc_len": args.doc_len,
             "answer_len": args.answer_len, "epoch_s": statistics.median(times), "epoch_s_all": times,
             "steps": steps[loss], "teacher_topk_once_s": teacher_s if loss == "pd" else None}
            for loss, times in seconds.items()]
    rows[0]["speedup_vs_online_kl"] = rows[1]["epoch_s"] / rows[0]["epoch_s"]
    rows[0]["speedup_10_epochs_incl_teacher"] = 10 * rows[1]["epoch_s"] / (10 * rows[0]["epoch_s"] + teacher_s)
    return rows


def packed_row_run(mode: str, tokens: int, preset: str, reps: int = 3) -> dict:
    """Median fwd+bwd time and peak memory of one packed row, `mode` "mask" or "positions"."""
    config, dtype, _, _, _ = PRESETS[preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=tokens)).to(device, dtype).train()
    seq = 128
    ids = torch.randint(3, config["vocab_size"], (1, tokens), device=device)
    positions = torch.arange(seq, device=device).repeat(tokens // seq)[None]
    segments = torch.arange(tokens, device=device) // seq

    def step():
        mask = modeling.segment_attention_mask(segments) if mode == "mask" else None
        modeling.hidden_states(model, ids, positions, mask).float().pow(2).mean().backward()

    peak = peak_memory(step)  # first, in a fresh process: later peaks hide behind the allocator's cache
    timing = time_fn(step, warmup=0, reps=reps)
    return {"bench": "packed", "path": mode, "tokens": tokens, "median_ms": timing["median_ms"],
            "peak_mib": peak / 2**20}


def bench_packed(args) -> list[dict]:
    import json
    import subprocess

    rows = []
    for tokens in (2048, 8192):
        for mode in ("mask", "positions"):
            cmd = [sys.executable, __file__, "--packed-worker", f"{mode}:{tokens}", "--preset", args.preset]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="default: llama-1b on CUDA, cpu otherwise")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--answer-frac", type=float, default=0.5, help="share of each row that is answer")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-max-batch", dest="find_max", action="store_false")
    parser.add_argument("--no-epoch", dest="epoch", action="store_false")
    parser.add_argument("--no-step", dest="step", action="store_false")
    parser.add_argument("--epoch-reps", type=int, default=3, help="epochs timed per loss (median)")
    parser.add_argument("--epoch-items", type=int, default=32)
    parser.add_argument("--doc-len", type=int, default=512)
    parser.add_argument("--answer-len", type=int, default=48)
    parser.add_argument("--epoch-batch-tokens", type=int, default=1024)
    parser.add_argument("--name", default="train_step")
    parser.add_argument("--worker", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--packed", action="store_true", help="packed rows: dense mask vs position_ids (issue 13)")
    parser.add_argument("--packed-worker", help=argparse.SUPPRESS)  # MODE:TOKENS, one measurement
    argv = sys.argv[1:] if argv is None else argv
    add_save_flag(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("llama-1b" if device.type == "cuda" else "cpu")
    if device.type == "cpu" and PRESETS[args.preset][1] == torch.bfloat16:
        raise SystemExit(f"preset {args.preset} is bf16 and GPU-sized: run it on a GPU")
    if args.worker:
        import json

        print(json.dumps(measure_step(args, device, args.worker)))
        return 0
    if args.packed_worker:
        import json

        mode, tokens = args.packed_worker.split(":")
        print(json.dumps(packed_row_run(mode, int(tokens), args.preset)))
        return 0
    print(environment(), pdengine.backend_info())
    if args.packed:
        rows = bench_packed(args)
        print_table(rows, ["path", "tokens", "median_ms", "peak_mib"])
        print("saved", save_results("train_step_packed", rows, args.save))
        return 0
    rows = bench_step(args, argv, device) if args.step else []
    if args.epoch:
        rows += bench_epoch(args, device)
    for r in rows:
        r["backend"] = pdengine.backend_info()[device.type]
    print_table([r for r in rows if r["bench"] == "step"],
                ["path", "batch", "seq", "median_ms", "median_ms_own_process", "peak_mib", "max_batch",
                 "time_ratio_vs_hf", "memory_ratio_vs_hf", "max_batch_ratio_vs_hf"])
    print_table([r for r in rows if r["bench"] == "epoch"],
                ["path", "items", "epoch_s", "steps", "teacher_topk_once_s", "speedup_vs_online_kl",
                 "speedup_10_epochs_incl_teacher"])
    print("saved", save_results(args.name, rows, args.save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
