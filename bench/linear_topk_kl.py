"""Benchmark the fused linear + top-k KL loss against its baselines, in the same run.

    python bench/linear_topk_kl.py [--shapes gpu|cpu] [--reps 5] [--warmup 2] [--chunk 1024]

Implementations (tail mode, temperature 2), each timed twice: with a trainable lm_head weight
(every implementation computes dW) and with a frozen one (the LoRA case: no dW):
- `naive`: the materialized path, `logits = (h @ W.T).float()`, log-softmax, gather, KL: the
  math of `pdengine.reference.linear_topk_kl`, with the GEMM in the input dtype (the
  reference itself upcasts h and W to fp32 first, which on a GPU would time an fp32 GEMM).
  Checked against the reference at the start of every shape.
- `torch.compile`: `naive` through torch.compile (the compile is part of the warm-up).
- `chunked`: token chunks of `--chunk` rows, each chunk's logits materialized inside
  torch.utils.checkpoint (the Liger-Kernel / torchtune approach: [chunk, V] alive at once,
  recomputed in the backward).
- `pdengine`: `pdengine.linear_topk_kl(..., validate=False)`: the backend that
  `pdengine.backend_info()` names (Triton on CUDA; the C++ kernels on CPU; on a CPU without
  pdengine._C it is skipped rather than timing the materialized fallback). On CPU this mean
  loss takes the single pass (gradients computed in the forward, 6 N d V GEMM FLOPs; 4
  with a frozen weight).
- `pdengine-2pass`: the same op with reduction="none", then `.mean()`: forward, then a
  backward that recomputes the logit tiles (8 N d V; 6 with a frozen weight).
- k = 1 cross-entropy rows (lp = 0, so KL = CE): `pdengine` against Liger's
  LigerFusedLinearCrossEntropyLoss and cut-cross-entropy's linear_cross_entropy, when they
  are installed (CUDA only); skipped with a note otherwise.

Each row: forward, backward and forward+backward medians (p20/p80 in the JSON), TFLOP/s and
(forward and backward are timed one implementation after the other; forward+backward, the
figure the targets are about, round-robin over the implementations, so that a slow stretch
of a shared machine hits all of them alike)
the peak memory of forward+backward above the inputs (weight and hidden grads included).
CUDA: max_memory_allocated. CPU: each implementation's peak resident set is measured in a
fresh subprocess started with MALLOC_MMAP_THRESHOLD_=65536, so glibc returns every freed
large buffer to the OS and the resident set follows the live tensors; in one process the
allocator would keep the previous implementation's freed pages and hide the next one's. FLOPs: 2 N d V forward, 6 N d V
backward with recompute (4 N d V without dW), 8 N d V forward+backward (6 with a frozen
weight), the same count for every implementation (so TFLOP/s compares wall time; the
materialized ones and the single pass do 2 N d V less). The GPU rows also time the bare `h @ W.T` GEMM: the fused fwd+bwd as a fraction of
that rate is the number the issue's target is about.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint

from common import (_sync, environment, op_bench_parser, peak_memory, print_table, save_results, summarize_ms, time_fn,
                    time_round_robin, tflops)

import pdengine
from pdengine import reference
from pdengine.ops import _library

# (name, N, d, V, k, dtype)
GPU_SHAPES = [
    ("llama3-8b-N4k", 4096, 4096, 128256, 64, torch.bfloat16),
    ("llama3-8b-N16k", 16384, 4096, 128256, 64, torch.bfloat16),
]
GPU_CE_SHAPES = [("llama3-8b-N16k-k1", 16384, 4096, 128256, 1, torch.bfloat16)]
CPU_SHAPES = [("cpu-issue3", 2048, 256, 32000, 32, torch.float32)]
TEMPERATURE = 2.0
COLUMNS = ["shape", "impl", "weight_grad", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_tflops", "peak_mem_MB", "extra_mem_MB",
           "loss_rel_diff"]


# ------------------------------------------------------------------ implementations


def _kl_from_logits(logits, ids, lp, temperature):
    """Tail-mode top-k KL per token from materialized logits (reference.linear_topk_kl math)."""
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)
    logq_ids = logq.gather(1, ids)
    p = lp.exp()
    tail_teacher = (1 - p.sum(-1)).clamp(min=0)
    tail_student = (1 - logq_ids.exp().sum(-1)).clamp(min=reference.TAIL_MASS_EPS)
    kl = (p * (lp - logq_ids)).sum(-1)
    return kl + torch.xlogy(tail_teacher, tail_teacher) - tail_teacher * tail_student.log()


def naive(hidden, weight, ids, lp):
    return _kl_from_logits(hidden @ weight.T, ids, lp, TEMPERATURE).mean()


def _chunk_sum(hidden, weight, ids, lp):
    return _kl_from_logits(hidden @ weight.T, ids, lp, TEMPERATURE).sum()


def make_chunked(chunk):
    def chunked(hidden, weight, ids, lp):
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk):
            sl = slice(s, s + chunk)
            total = total + checkpoint(_chunk_sum, hidden[sl], weight, ids[sl], lp[sl], use_reentrant=False)
        return total / hidden.shape[0]

    return chunked


def fused(hidden, weight, ids, lp):
    return pdengine.linear_topk_kl(hidden, weight, ids, lp, temperature=TEMPERATURE, mode="tail", validate=False)


def fused_two_pass(hidden, weight, ids, lp):
    return pdengine.linear_topk_kl(hidden, weight, ids, lp, temperature=TEMPERATURE, mode="tail", validate=False,
                                   reduction="none").mean()


def ce_implementations():
    """k = 1 cross-entropy baselines that are installed: name -> fn(hidden, weight, labels)."""
    impls, notes = {}, []
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger-flce"] = lambda h, w, y: liger(w, h, y)
    except ImportError:
        notes.append("liger_kernel not installed: Liger fused linear CE skipped")
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cut-cross-entropy"] = lambda h, w, y: linear_cross_entropy(h, w, y)
    except ImportError:
        notes.append("cut_cross_entropy not installed: CCE skipped")
    return impls, notes


# ---------------------------------------------------------------------------- timing


def time_backward(make_loss, warmup, reps) -> dict:
    """Backward alone: each repetition runs an untimed forward first."""
    times = []
    for i in range(warmup + reps):
        loss = make_loss()
        _sync()
        start = time.perf_counter()
        loss.backward()
        _sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return summarize_ms(times)


def fwd_bwd_step(fn, inputs, leaves):
    """One forward + backward of loss = fn(*inputs), from cleared gradients."""

    def step():
        for t in leaves:
            t.grad = None
        fn(*inputs).backward()

    return step


def measure(fn, inputs, leaves, warmup, reps, memory_of=None, fwd_bwd=True) -> dict:
    """fwd / bwd / fwd+bwd timings and fwd+bwd peak memory of loss = fn(*inputs).

    memory_of: a callable returning the peak bytes measured elsewhere (CPU subprocess).
    fwd_bwd=False leaves the fwd+bwd timing to the caller (time_round_robin)."""
    step = fwd_bwd_step(fn, inputs, leaves)
    fwd = time_fn(lambda: fn(*inputs), warmup, reps)
    bwd = time_backward(lambda: (step_zero(leaves), fn(*inputs))[1], warmup, reps)
    timings = [("fwd", fwd), ("bwd", bwd)] + ([("fwd_bwd", time_fn(step, warmup, reps))] if fwd_bwd else [])
    step_zero(leaves)
    memory = memory_of() if memory_of is not None else peak_memory(step)
    out = {}
    for tag, t in timings:
        out[f"{tag}_ms"], out[f"{tag}_p20_ms"], out[f"{tag}_p80_ms"] = t["median_ms"], t["p20_ms"], t["p80_ms"]
    out["peak_mem_MB"] = memory / 2**20
    return out


def step_zero(leaves):
    for t in leaves:
        t.grad = None


def _flops_row(row, n, d, vocab, weight_grad=True):
    base = n * d * vocab
    bwd = 6 if weight_grad else 4
    row["fwd_tflops"] = tflops(2 * base, row["fwd_ms"])
    row["bwd_tflops"] = tflops(bwd * base, row["bwd_ms"])
    row["fwd_bwd_tflops"] = tflops((2 + bwd) * base, row["fwd_bwd_ms"])
    return row


def _run_guarded(fn):
    """OOM is a result (the materialized paths at 16k x 128k), not a crash."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "OOM"
    except RuntimeError as e:  # CPU allocator failures
        if "out of memory" in str(e).lower() or "can't allocate" in str(e).lower():
            return None, "OOM"
        raise


# ---------------------------------------------------------------------------- shapes


def _inputs(n, d, vocab, k, dtype, device, weight_grad=True):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, d, device=device, dtype=dtype, generator=g) * d**-0.5).requires_grad_(weight_grad)
    teacher = torch.randn(n, vocab, device=device, dtype=torch.float32, generator=g) * 2
    lp, ids = torch.log_softmax(teacher / TEMPERATURE, dim=-1).topk(k, dim=-1)
    del teacher
    return hidden, weight, ids, lp


def _check_naive_matches_reference(device):
    """`naive` (GEMM in the input dtype) is the reference's math: check once, small."""
    h, w, ids, lp = _inputs(64, 32, 512, 8, torch.float32, device)
    want = reference.linear_topk_kl(h, w, ids, lp, temperature=TEMPERATURE, mode="tail")
    torch.testing.assert_close(naive(h, w, ids, lp), want, rtol=1e-5, atol=1e-6)


def topk_implementations(device, chunk):
    impls = {"naive": naive, "torch.compile": torch.compile(naive, dynamic=False), "chunked": make_chunked(chunk)}
    notes = []
    if device == "cuda" or _library.HAS_CPP:
        impls["pdengine"] = fused
        impls["pdengine-2pass"] = fused_two_pass
    else:
        notes.append("pdengine._C not built: the fused CPU row (C++ backend) is skipped")
    return impls, notes


def cpu_peak_memory_subprocess(shape, impl, chunk, weight_grad) -> int:
    """Peak resident-set rise of one fwd+bwd of `impl`, in a fresh process (module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-of", json.dumps([list(shape[:5]), impl, chunk, weight_grad])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _memory_child(spec) -> int:
    (name, n, d, vocab, k), impl, chunk, weight_grad = json.loads(spec)
    inputs = _inputs(n, d, vocab, k, torch.float32, "cpu", weight_grad)
    fn = topk_implementations("cpu", chunk)[0][impl]
    fn(*inputs).backward()  # warm-up: lazy initialisation and compilation are not charged
    for t in inputs[:2]:
        t.grad = None
    print(peak_memory(lambda: fn(*inputs).backward()))
    return 0


def bench_topk_shape(shape, device, warmup, reps, chunk, weight_grad) -> list[dict]:
    """One row per implementation. fwd and bwd are timed one implementation after the
    other; fwd+bwd (the number the targets are about) round-robin over all of them."""
    name, n, d, vocab, k, dtype = shape
    inputs = _inputs(n, d, vocab, k, dtype, device, weight_grad)
    leaves = inputs[:2] if weight_grad else inputs[:1]
    impls, notes = topk_implementations(device, chunk)
    for note in notes:
        print("note:", note, file=sys.stderr)
    with torch.no_grad():
        ref_loss, _ = _run_guarded(lambda: float(naive(*inputs)))
    rows, steps = {}, {}
    for impl, fn in impls.items():
        memory_of = None
        if device == "cpu":
            memory_of = lambda: cpu_peak_memory_subprocess(shape, impl, chunk, weight_grad)  # noqa: E731
        res, err = _run_guarded(lambda: measure(fn, inputs, leaves, warmup, reps, memory_of, fwd_bwd=False))
        row = {"shape": name, "impl": impl, "weight_grad": weight_grad, "N": n, "d": d, "V": vocab, "k": k,
               "dtype": str(dtype).removeprefix("torch."), "chunk": chunk if impl == "chunked" else None,
               "backend": _library.backend_info()[device] if impl.startswith("pdengine") else "torch"}
        if err:
            row["error"] = err
        else:
            row.update(res)
            # beyond the hidden (and weight) gradients, which every implementation returns
            grads_mb = sum(t.numel() * t.element_size() for t in leaves) / 2**20
            row["extra_mem_MB"] = row["peak_mem_MB"] - grads_mb
            with torch.no_grad():
                loss = float(fn(*inputs))
            row["loss_rel_diff"] = abs(loss - ref_loss) / abs(ref_loss) if ref_loss else None
            steps[impl] = fwd_bwd_step(fn, inputs, leaves)
        rows[impl] = row
    for impl, t in time_round_robin(steps, warmup, reps).items():
        row = rows[impl]
        row["fwd_bwd_ms"], row["fwd_bwd_p20_ms"], row["fwd_bwd_p80_ms"] = t["median_ms"], t["p20_ms"], t["p80_ms"]
        _flops_row(row, n, d, vocab, weight_grad)
    step_zero(leaves)
    print_table(list(rows.values()), COLUMNS)
    return list(rows.values())


def bench_ce_shape(shape, device, warmup, reps) -> list[dict]:
    """k = 1 with lp = 0: the loss is cross-entropy on the ids, comparable with fused CE kernels."""
    name, n, d, vocab, _k, dtype = shape
    hidden, weight, _ids, _lp = _inputs(n, d, vocab, 1, dtype, device)
    labels = torch.randint(0, vocab, (n,), device=device)
    ids, lp = labels[:, None], torch.zeros(n, 1, device=device)
    impls, notes = ce_implementations()
    impls = {"pdengine": lambda h, w, y: pdengine.linear_topk_kl(h, w, ids, lp, validate=False), **impls}
    for note in notes:
        print("note:", note, file=sys.stderr)
    rows = []
    with torch.no_grad():
        ref = float(torch.nn.functional.cross_entropy((hidden[:1024] @ weight.T).float(), labels[:1024]))
    for impl, fn in impls.items():
        res, err = _run_guarded(lambda: measure(fn, (hidden, weight, labels), (hidden, weight), warmup, reps))
        row = {"shape": name, "impl": impl, "weight_grad": True, "N": n, "d": d, "V": vocab, "k": 1,
               "dtype": str(dtype).removeprefix("torch.")}
        if err:
            row["error"] = err
        else:
            row.update(_flops_row(res, n, d, vocab))
            row["extra_mem_MB"] = row["peak_mem_MB"] - (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
            with torch.no_grad():
                first = float(fn(hidden[:1024], weight, labels[:1024])) if impl != "pdengine" else float(
                    pdengine.linear_topk_kl(hidden[:1024], weight, ids[:1024], lp[:1024], validate=False))
            row["loss_rel_diff"] = abs(first - ref) / abs(ref)
        rows.append(row)
        print_table([row], COLUMNS)
    return rows, notes


def bench_gemm(shape, device, warmup, reps) -> dict:
    """The bare lm_head GEMM h @ W.T at the same shape: the rate the fused kernel is judged by."""
    name, n, d, vocab, k, dtype = shape
    h = torch.randn(n, d, device=device, dtype=dtype)
    w = torch.randn(vocab, d, device=device, dtype=dtype)
    t = time_fn(lambda: h @ w.T, warmup, reps)
    row = {"shape": name, "impl": "gemm h@W.T", "N": n, "d": d, "V": vocab, "k": k,
           "dtype": str(dtype).removeprefix("torch."), "fwd_ms": t["median_ms"],
           "fwd_tflops": tflops(2 * n * d * vocab, t["median_ms"])}
    print_table([row], ["shape", "impl", "fwd_ms", "fwd_tflops"])
    return row


def main(argv=None) -> int:
    parser = op_bench_parser(__doc__)
    parser.add_argument("--chunk", type=int, default=None, help="token chunk of the chunked baseline")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # CPU subprocess mode
    args = parser.parse_args(argv)
    if args.memory_of:
        return _memory_child(args.memory_of)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shapes == "gpu" and device != "cuda":
        parser.error("--shapes gpu needs a CUDA device")
    chunk = args.chunk or (1024 if device == "cuda" else 256)
    print(environment(), pdengine.backend_info(), file=sys.stderr)
    _check_naive_matches_reference(device)
    rows, notes = [], []
    for shape in GPU_SHAPES if args.shapes == "gpu" else CPU_SHAPES:
        if device == "cuda":
            rows.append(bench_gemm(shape, device, args.warmup, args.reps))
        for weight_grad in (True, False):
            rows += bench_topk_shape(shape, device, args.warmup, args.reps, chunk, weight_grad)
    if args.shapes == "gpu":
        for shape in GPU_CE_SHAPES:
            ce_rows, ce_notes = bench_ce_shape(shape, device, args.warmup, args.reps)
            rows += ce_rows
            notes += ce_notes
    else:
        notes.append("k=1 Liger / cut-cross-entropy rows need CUDA: skipped on CPU")
    for note in notes:
        rows.append({"note": note})
    print_table([r for r in rows if "impl" in r], COLUMNS)
    print(save_results("linear_topk_kl", rows, args.save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
