"""The GPU suite: every check and benchmark a first GPU run needs, in one command.

`pdengine bench gpu [--save] [--wheels DIR] [--sections a,b,...]` on a CUDA machine (H100 /
H200, no network needed), in a few minutes:

1. ops        the CUDA-marked op tests (tests/test_cuda_ops.py: bf16/fp16/fp32 vs float64)
2. machine    the bf16 GEMM rate (one large cuBLAS matmul) and the memory bandwidth (a copy)
3. fused_loss fwd+bwd at N=16384, d=4096, V=128256, k=64 in bf16, trainable and frozen
              lm_head: pdengine single pass and two-pass, the materialized torch loss,
              torch.compile of it, and, when importable, Liger-Kernel's fused linear
              cross-entropy / JSD and Apple's cut-cross-entropy (CE rows, k=1)
4. lora       lora_linear vs PEFT's unfused LoRA, r=16 and 64, 4096x4096 and 4096x14336
5. topk       teacher_topk vs torch.topk over materialized logits
6. model      a train step and a prefill (teacher forward + top-k) on a random ~1B Llama

It writes one JSON (device, versions, every row) through bench/common.py's save_results
(bench/runs/<timestamp>/gpu_suite.json; bench/results/ with --save) and prints a short
table last. Rows report time, TFLOP/s from the FLOP formula next to each row, its percent
of the GEMM rate measured in section 2, and peak memory.

`--dry-run` runs the same code on a CPU at tiny shapes (the op tests in the Triton
interpreter, torch.compile with the aot_eager backend, no peers required), so CI keeps the
suite from rotting. Peers: bench/gpu_wheels.sh fetches liger-kernel and cut-cross-entropy
wheels on a machine with a registry; `--wheels DIR` (default bench/wheels/) installs them
from there with `pip --no-index` into a temporary folder.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import _sync, add_save_flag, environment, peak_memory, print_table, save_results, time_fn  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SECTIONS = ("ops", "machine", "fused_loss", "lora", "topk", "model")

# shapes: real run / dry run
LOSS = dict(n=16384, d=4096, v=128256, k=64)
LOSS_DRY = dict(n=48, d=32, v=500, k=8)
LORA = dict(n=8192, dims=[(4096, 4096), (4096, 14336)], ranks=[16, 64])
LORA_DRY = dict(n=32, dims=[(48, 48), (48, 96)], ranks=[4, 8])
TOPK = dict(n=4096, d=4096, v=128256, k=64)
TOPK_DRY = dict(n=24, d=32, v=500, k=8)
# a random Llama of ~1.1 B parameters (TinyLlama's shape) / a tiny one
MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, batch=4, seq=1024)
MODEL_DRY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=500, batch=2, seq=32)


class Suite:
    def __init__(self, dry_run: bool, reps: int):
        self.dry = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.dtype = torch.float32 if dry_run else torch.bfloat16  # the CPU has no fast bf16 GEMM
        self.reps = reps
        self.rows: list[dict] = []
        self.gemm_tflops = None

    def add(self, section, name, impl, ms=None, flops=None, peak=None, **extra):
        row = {"section": section, "name": name, "impl": impl, "ms": ms}
        if ms and flops:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
            if self.gemm_tflops:
                row["pct_gemm"] = 100 * row["tflops"] / self.gemm_tflops
        if peak is not None:
            row["peak_mb"] = peak / 2**20
        row.update(extra)
        self.rows.append(row)
        return row

    def timed(self, section, name, impl, fn, flops=None, peer=False, **extra):
        """time_fn + peak_memory of fn, or a row saying why it could not run. A peer's
        failure (another library, e.g. a Triton-only one in a CPU dry run) is noted; ours
        fails the suite."""
        try:
            timing = time_fn(fn, warmup=1, reps=self.reps)
            peak = peak_memory(fn)
        except Exception as e:  # one failing row must not end the suite
            first_line = (str(e).splitlines() or [""])[0][:200]
            return self.add(section, name, impl, failed=not peer, note=f"error: {type(e).__name__}: {first_line}")
        return self.add(section, name, impl, timing["median_ms"], flops, peak, **extra)


# ------------------------------------------------------------------------------- sections


def section_ops(suite: Suite):
    """pytest on tests/test_cuda_ops.py (in the interpreter for a dry run)."""
    env = dict(os.environ)
    if suite.dry:
        env.update(TRITON_INTERPRET="1", PDENGINE_CUDA_TESTS_ON_CPU="1")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_cuda_ops.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    summary = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    suite.add("ops", "tests/test_cuda_ops.py", "pytest", (time.perf_counter() - start) * 1e3,
              failed=out.returncode != 0, note=summary)
    if out.returncode != 0:
        print(out.stdout[-4000:], file=sys.stderr)


def section_machine(suite: Suite):
    """The bf16 GEMM rate and the copy bandwidth every later row is compared with."""
    n = 256 if suite.dry else 8192
    a = torch.randn(n, n, device=suite.device, dtype=suite.dtype)
    b = torch.randn(n, n, device=suite.device, dtype=suite.dtype)
    row = suite.timed("machine", f"matmul {n}^3 {str(suite.dtype)[6:]}", "torch matmul (cuBLAS on a GPU)",
                      lambda: a @ b, flops=2 * n**3)
    suite.gemm_tflops = row.get("tflops")
    row["pct_gemm"] = 100.0 if suite.gemm_tflops else None
    numel = (1 << 20) if suite.dry else (1 << 30)  # 2 GiB of bf16 each way on a GPU
    src = torch.empty(numel, device=suite.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), warmup=1, reps=suite.reps)
    moved = 2 * src.numel() * src.element_size()
    rate = moved / (timing["median_ms"] * 1e-3) / 1e9
    suite.add("machine", f"copy {moved / 2**30:.3g} GiB", "torch", timing["median_ms"], gb_per_s=rate,
              note=f"{rate:.3g} GB/s (read + write)")


def _loss_inputs(suite, shape, trainable, k=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, v = shape["n"], shape["d"], shape["v"]
    k = k or shape["k"]
    dev, dt = suite.device, suite.dtype
    hidden = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(dev, dt).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dev, dt).requires_grad_(trainable)
    ids = torch.randint(0, v, (n, k), generator=g).to(dev)
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1).to(dev) - 1.0
    labels = ids[:, 0].clone()
    return hidden, weight, ids, lp, labels


def _fused_loss_flops(n, d, v, trainable):
    """The useful GEMM FLOPs of a fused loss fwd+bwd, whatever an implementation recomputes:
    logits 2NdV, dh 2NdV, dW 2NdV (trainable only)."""
    return (6 if trainable else 4) * n * d * v


def _materialized(hidden, weight, ids, lp, temperature=2.0):
    """The plain torch loss (what pdengine avoids): [N, V] logits, full softmax, tail KL."""
    logq = torch.log_softmax(hidden.float() @ weight.float().T / temperature, -1)
    return reference_tail_kl(logq, ids, lp)


def reference_tail_kl(logq, ids, lp):
    q_ids = logq.gather(1, ids)
    p = lp.exp()
    r = (1 - p.sum(-1)).clamp(min=0)
    s = (1 - q_ids.exp().sum(-1)).clamp(min=1e-6)
    return ((p * (lp - q_ids)).sum(-1) + r * (r.clamp(min=1e-30).log() - s.log())).mean()


def section_fused_loss(suite: Suite):
    import pdengine

    shape = LOSS_DRY if suite.dry else LOSS
    n, d, v, k = shape["n"], shape["d"], shape["v"], shape["k"]
    compile_backend = "aot_eager" if suite.dry else "inductor"
    for trainable in (True, False):
        tag = f"KL k={k} N={n} d={d} V={v} {'trainable' if trainable else 'frozen'}"
        flops = _fused_loss_flops(n, d, v, trainable)
        hidden, weight, ids, lp, labels = _loss_inputs(suite, shape, trainable)
        kw = dict(temperature=2.0, mode="tail", validate=False)

        def single():
            pdengine.linear_topk_kl(hidden, weight, ids, lp, **kw).backward()

        def two_pass():
            pdengine.linear_topk_kl(hidden, weight, ids, lp, reduction="none", **kw).mean().backward()

        compiled = torch.compile(_materialized, backend=compile_backend)
        suite.timed("fused_loss", tag, "pdengine single pass", single, flops)
        suite.timed("fused_loss", tag, "pdengine two-pass", two_pass, flops)
        suite.timed("fused_loss", tag, "torch materialized",
                    lambda: _materialized(hidden, weight, ids, lp).backward(), flops)
        suite.timed("fused_loss", tag, f"torch.compile ({compile_backend})",
                    lambda: compiled(hidden, weight, ids, lp).backward(), flops)
        _peer_kl_rows(suite, tag, flops, hidden, weight, ids, lp)
        del hidden, weight, ids, lp
    _ce_rows(suite, shape)


def _peer_kl_rows(suite, tag, flops, hidden, weight, ids, lp):
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        suite.add("fused_loss", tag, "Liger fused linear JSD", note="liger-kernel not importable")
        return
    # Liger's JSD needs full teacher logits: give it the teacher's lm_head input instead
    teacher_hidden = hidden.detach()
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=2.0)  # beta 0: forward KL
    suite.timed("fused_loss", tag, "Liger fused linear JSD (beta=0, full teacher)",
                lambda: jsd(hidden, weight, teacher_hidden, weight.detach(), None).backward(), flops, peer=True,
                note="full-vocabulary teacher (not top-k): a different loss of the same cost class")


def _ce_rows(suite, shape):
    """Cross-entropy (k = 1 with log-prob 0 is CE in pdengine) against the CE-only peers."""
    import pdengine

    n, d, v = shape["n"], shape["d"], shape["v"]
    for trainable in (True, False):
        tag = f"CE N={n} d={d} V={v} {'trainable' if trainable else 'frozen'}"
        flops = _fused_loss_flops(n, d, v, trainable)
        hidden, weight, ids, _lp, labels = _loss_inputs(suite, shape, trainable, k=1)
        zero = torch.zeros(n, 1, device=suite.device)
        suite.timed("fused_loss", tag, "pdengine single pass (k=1)", lambda: pdengine.linear_topk_kl(
            hidden, weight, labels[:, None], zero, temperature=1.0, validate=False).backward(), flops)
        suite.timed("fused_loss", tag, "torch materialized", lambda: torch.nn.functional.cross_entropy(
            (hidden @ weight.T).float(), labels).backward(), flops)
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            suite.timed("fused_loss", tag, "Liger fused linear CE",
                        lambda: liger(weight, hidden, labels).backward(), flops, peer=True)
        except ImportError:
            suite.add("fused_loss", tag, "Liger fused linear CE", note="liger-kernel not importable")
        try:
            from cut_cross_entropy import linear_cross_entropy

            suite.timed("fused_loss", tag, "cut-cross-entropy",
                        lambda: linear_cross_entropy(hidden, weight, labels).backward(), flops, peer=True)
        except ImportError:
            suite.add("fused_loss", tag, "cut-cross-entropy", note="cut-cross-entropy not importable")


def section_lora(suite: Suite):
    import pdengine

    cfg = LORA_DRY if suite.dry else LORA
    n = cfg["n"]
    for d_in, d_out in cfg["dims"]:
        for r in cfg["ranks"]:
            tag = f"lora_linear N={n} {d_in}x{d_out} r={r} fwd+bwd"
            g = torch.Generator().manual_seed(r)
            x = torch.randn(n, d_in, generator=g).to(suite.device, suite.dtype).requires_grad_(True)
            w = (torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)).to(suite.device, suite.dtype)
            a = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).to(suite.device, suite.dtype).requires_grad_(True)
            b = torch.zeros(d_out, r, device=suite.device, dtype=suite.dtype).requires_grad_(True)
            # forward 2 N d_in d_out + LoRA; backward dx only for the frozen W (2 N d_in d_out)
            flops = 4 * n * d_in * d_out + 6 * n * r * (d_in + d_out)
            suite.timed("lora", tag, "pdengine lora_linear", lambda: pdengine.lora_linear(
                x, w, a, b, 2.0, dropout=0.05, seed=1).sum().backward(), flops)
            peft_layer = _peft_linear(w, a, b, r, suite)
            if peft_layer is None:
                suite.add("lora", tag, "PEFT LoRA (unfused)", note="peft not importable")
            else:
                suite.timed("lora", tag, "PEFT LoRA (unfused)", lambda: peft_layer(x).sum().backward(), flops,
                            peer=True)


def _peft_linear(w, a, b, r, suite):
    """PEFT's own LoRA layer (unfused: base matmul + dropout + A + B) on the same weights."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)

        def forward(self, x):
            return self.proj(x)

    base = Proj().to(suite.device, suite.dtype)
    base.proj.weight.data.copy_(w)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return model


def section_topk(suite: Suite):
    import pdengine

    cfg = TOPK_DRY if suite.dry else TOPK
    n, d, v, k = cfg["n"], cfg["d"], cfg["v"], cfg["k"]
    g = torch.Generator().manual_seed(5)
    h = torch.randn(n, d, generator=g).to(suite.device, suite.dtype)
    w = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(suite.device, suite.dtype)
    tag = f"teacher_topk N={n} d={d} V={v} k={k}"
    flops = 2 * n * d * v
    suite.timed("topk", tag, "pdengine teacher_topk", lambda: pdengine.teacher_topk(h, w, k, 2.0), flops)
    suite.timed("topk", tag, "torch logits + log_softmax + topk", lambda: torch.log_softmax(
        (h @ w.T).float() / 2.0, -1).topk(k, -1), flops)


def section_model(suite: Suite):
    """A train step (LoRA body + fused loss + AdamW) and a prefill on a random Llama."""
    import pdengine
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(MODEL_DRY if suite.dry else MODEL)
    batch, seq = cfg.pop("batch"), cfg.pop("seq")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(suite.device, suite.dtype)
    params = sum(p.numel() for p in model.parameters())
    tokens = batch * seq
    tag = f"Llama {params / 1e9:.2f} B params, {batch}x{seq} tokens"
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=suite.device)
    k = 64 if not suite.dry else 8
    with torch.no_grad():
        def prefill():
            hidden = model.model(input_ids=ids).last_hidden_state.reshape(tokens, -1)
            return pdengine.teacher_topk(hidden, model.lm_head.weight, k, 2.0)

        teacher_ids, teacher_lp = prefill()
    flops_fwd = 2 * params * tokens
    suite.timed("model", tag, "prefill (teacher forward + teacher_topk)", lambda: torch.no_grad()(prefill)(),
                flops_fwd, tokens_per_s=None)
    model = pdengine.add_lora(model, r=16, alpha=32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)

    def step():
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(tokens, -1)
        loss = pdengine.linear_topk_kl(hidden, model.lm_head.weight, teacher_ids, teacher_lp,
                                       temperature=2.0, validate=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # forward 2 P T, backward ~2 P T for the activations (frozen base: no weight grads)
    suite.timed("model", tag, "train step (LoRA r=16, fused loss, AdamW)", step, 2 * flops_fwd)
    for row in suite.rows[-2:]:
        if row.get("ms"):
            row["tokens_per_s"] = tokens / (row["ms"] * 1e-3)


RUNNERS = {"ops": section_ops, "machine": section_machine, "fused_loss": section_fused_loss,
           "lora": section_lora, "topk": section_topk, "model": section_model}


# ---------------------------------------------------------------------------------- peers


def install_wheels(folder: Path) -> str | None:
    """pip --no-index the peer wheels found in `folder` into a temporary target on sys.path."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return None
    target = tempfile.mkdtemp(prefix="pdengine-gpu-peers-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", target, *map(str, wheels)], check=True)
    sys.path.insert(0, target)
    return target


# ----------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; dry run 1)")
    parser.add_argument("--wheels", default=str(BENCH / "wheels"), help="folder of peer wheels (gpu_wheels.sh)")
    add_save_flag(parser)
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on a CPU")
    if args.dry_run and args.save:
        parser.error("--save keeps GPU figures only; a dry run writes to bench/runs/")
    peers = install_wheels(Path(args.wheels))
    suite = Suite(args.dry_run, args.reps or (1 if args.dry_run else 3))
    start = time.perf_counter()
    for name in sections:
        t0 = time.perf_counter()
        try:
            RUNNERS[name](suite)
        except Exception:  # report and go on: one broken section must not hide the others
            traceback.print_exc()
            suite.add(name, "(section)", "-", failed=True,
                      note="error: " + traceback.format_exc().splitlines()[-1][:300])
        _sync()
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    extra = dict(dry_run=args.dry_run, peers_from=peers, total_s=time.perf_counter() - start,
                 gemm_tflops=suite.gemm_tflops)
    env = {**environment(), **extra}
    path = save_results("gpu_suite", suite.rows, args.save, extra)
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  {env['total_s']:.0f} s  -> {path}")
    print_table(suite.rows, ["section", "name", "impl", "ms", "tflops", "pct_gemm", "peak_mb", "note"])
    failed = [r for r in suite.rows if r.get("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
