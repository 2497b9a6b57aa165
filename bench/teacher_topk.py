"""Benchmark teacher_topk against the materialized torch baseline, in the same run.

    python bench/teacher_topk.py [--shapes gpu|cpu] [--reps 5] [--warmup 2]

Implementations (each row: median / p20 / p80 ms, peak memory above the inputs, TFLOP/s):
- `torch`: logits = hidden @ weight.T, (soft-cap), log_softmax in fp32, topk: materializes
  [N, V] (what a plain teacher forward does).
- `torch.compile`: the same function through torch.compile (the compile is a warm-up).
- `pdengine`: `pdengine.teacher_topk`, i.e. the backend `pdengine.backend_info()` names
  (Triton on CUDA; the C++ kernel on CPU when pdengine._C is built).
- `triton-interpreter` (CPU only, the tiny shape only): the Triton kernel under
  TRITON_INTERPRET=1; checks it runs, its time says nothing about a GPU.

FLOPs: 2 * N * d * V (the lm_head GEMM; the top-k and lse are O(N * V) and not counted).
Each row also records how far it is from `torch` (max |logprob diff|, id agreement). With
bf16 inputs the baseline rounds the logits to bf16 (as an HF lm_head does) while the kernel
keeps them in fp32, so expect differences of the order of bf16 rounding there.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():  # the Triton row on CPU needs the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import environment, op_bench_parser, peak_memory, print_table, save_results, time_fn, tflops  # noqa: E402

import pdengine  # noqa: E402
from pdengine.ops import _library  # noqa: E402

# (name, N, d, V, k, dtype, temperature, softcap)
GPU_SHAPES = [
    ("llama3-8b", 16384, 4096, 128256, 64, torch.bfloat16, 2.0, 0.0),
    ("llama3-8b-k256", 4096, 4096, 128256, 256, torch.bfloat16, 2.0, 0.0),
    ("gemma2-softcap", 4096, 3584, 256000, 64, torch.bfloat16, 2.0, 30.0),
]
CPU_SHAPES = [
    ("cpu-tiny", 32, 64, 2048, 16, torch.float32, 2.0, 0.0),
    ("cpu-small", 64, 128, 4096, 64, torch.float32, 2.0, 0.0),
    ("cpu-medium", 512, 512, 32000, 64, torch.float32, 2.0, 0.0),
]


def materialized_topk(hidden, weight, k, temperature, softcap):
    """The baseline: full [N, V] logits, fp32 log-softmax, topk."""
    logits = (hidden @ weight.T).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logq = torch.log_softmax(logits / temperature, dim=-1)
    values, ids = logq.topk(k, dim=-1)
    return ids, values


def pdengine_topk(hidden, weight, k, temperature, softcap):
    return pdengine.teacher_topk(hidden, weight, k, temperature, softcap or None)


def triton_interpreter_topk(hidden, weight, k, temperature, softcap):
    from pdengine.kernels.teacher_topk import teacher_topk

    return teacher_topk(hidden, weight, k, temperature, softcap)


def implementations(device: str, shape_name: str):
    impls = {"torch": materialized_topk, "torch.compile": torch.compile(materialized_topk, dynamic=False)}
    on_cpu = device == "cpu"
    if not on_cpu or _library.HAS_CPP:
        impls["pdengine"] = pdengine_topk
    if on_cpu and shape_name == "cpu-tiny":
        impls["triton-interpreter"] = triton_interpreter_topk
    return impls


def agreement(ids, logprobs, ref_ids, ref_logprobs) -> dict:
    return {
        "max_abs_logprob_diff": float((logprobs.float() - ref_logprobs.float()).abs().max()),
        "id_agreement": float((ids == ref_ids).float().mean()),
    }


def bench_shape(shape, device, warmup, reps) -> list[dict]:
    name, n, d, vocab, k, dtype, temperature, softcap = shape
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, dtype=dtype, generator=g)
    weight = torch.randn(vocab, d, device=device, dtype=dtype, generator=g) * d**-0.5
    args = (hidden, weight, k, temperature, softcap)
    ref_ids, ref_logprobs = materialized_topk(*args)
    rows = []
    for impl, fn in implementations(device, name).items():
        slow = impl == "triton-interpreter"  # seconds per call: fewer repetitions
        timing = time_fn(lambda: fn(*args), warmup=1 if slow else warmup, reps=2 if slow else reps)
        memory = peak_memory(lambda: fn(*args))
        row = {
            "shape": name, "impl": impl, "N": n, "d": d, "V": vocab, "k": k, "dtype": str(dtype).removeprefix("torch."),
            "softcap": softcap, **timing, "peak_mem_MB": memory / 2**20,
            "tflops": tflops(2 * n * d * vocab, timing["median_ms"]),
            "backend": _library.backend_info()["cuda" if device == "cuda" else "cpu"] if impl == "pdengine" else impl,
        }
        row.update(agreement(*fn(*args), ref_ids, ref_logprobs))
        rows.append(row)
        print_table([row], ["shape", "impl", "median_ms", "peak_mem_MB", "tflops", "max_abs_logprob_diff", "id_agreement"])
    return rows


def main(argv=None) -> int:
    parser = op_bench_parser(__doc__)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = GPU_SHAPES if args.shapes == "gpu" else CPU_SHAPES
    print(environment(), file=sys.stderr)
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, device, args.warmup, args.reps)
    print_table(rows, ["shape", "impl", "median_ms", "p20_ms", "p80_ms", "peak_mem_MB", "tflops", "max_abs_logprob_diff", "id_agreement"])
    print(save_results("teacher_topk", rows, args.save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
