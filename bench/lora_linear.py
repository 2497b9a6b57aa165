"""Benchmark: fused LoRA linear (pdengine.lora_linear) against PEFT's unfused LoRA layer
and torch.compile of it, in one run.

    python bench/lora_linear.py                 # GPU: bf16, N=8192, d in {2048, 4096}, r in {16, 64, 1024}
    python bench/lora_linear.py --n 256         # CPU: fp32 (the GPU sizes take too long on CPU)

Every implementation computes `y = x W^T + s B(A(dropout(x)))` with W frozen and x, A, B
trainable (fwd+bwd returns dx, dA, dB, as inside a network). Rows go to
bench/results/lora_linear.{json,csv}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_save_flag, environment, peak_memory, print_table, save_results, tflops, time_fn  # noqa: E402

import pdengine  # noqa: E402


class UnfusedLoRA(nn.Module):
    """PEFT's LoRA Linear forward written out (used when peft is not installed)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scale


def peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float) -> tuple[nn.Module, str]:
    """PEFT's own lora.Linear around `base` (adapters in the base dtype), else UnfusedLoRA."""
    try:
        import inspect

        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear
    except ImportError:
        return UnfusedLoRA(base, r, alpha, dropout), "unfused-torch"
    if "config" in inspect.signature(PeftLinear.__init__).parameters:  # peft >= 0.18
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
        layer = PeftLinear(base, adapter_name="default", config=config, r=r, lora_alpha=alpha)
    else:
        layer = PeftLinear(base, adapter_name="default", r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer.to(device=base.weight.device, dtype=base.weight.dtype)
    return layer, "peft"


def lora_params(layer):
    if hasattr(layer.lora_A, "keys"):  # PEFT: ModuleDict keyed by adapter name
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.lora_A.weight, layer.lora_B.weight


def flops(n, d_in, d_out, r, mode):
    """Algorithmic FLOPs (no recompute): fwd 2N(d_in d_out + r(d_in + d_out));
    bwd dx 2N(d_out d_in + r(d_out + d_in)), dA 2N r d_in, dB 2N d_out r."""
    fwd = 2 * n * (d_in * d_out + r * (d_in + d_out))
    bwd = 2 * n * (d_out * d_in + r * (d_out + d_in)) + 2 * n * r * (d_in + d_out)
    return fwd if mode == "fwd" else fwd + bwd


def make_step(fn, x, grad, mode):
    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(x)
        else:
            fn(x).backward(grad)

    return step


def bench_shape(n, d, r, dtype, device, dropout, modes, use_compile, warmup, reps):
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    ref_layer, ref_name = peft_layer(base, r, 2 * r, dropout)
    lora_a, lora_b = lora_params(ref_layer)
    with torch.no_grad():
        lora_b.normal_(std=r**-0.5)  # non-zero B, as after some training
    ref_layer.train()
    scale = 2.0

    def fused(x):
        return pdengine.lora_linear(x, base.weight, lora_a, lora_b, scale, None, dropout)

    impls = {"pdengine-fused": fused, ref_name: ref_layer}
    if use_compile:
        impls[f"{ref_name}+torch.compile"] = torch.compile(ref_layer)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, d, device=device, dtype=dtype)
    rows = []
    for mode in modes:
        for name, fn in impls.items():
            step = make_step(fn, x, grad, mode)
            t = time_fn(step, warmup=warmup, reps=reps)
            mem = peak_memory(step)
            rows.append({
                "impl": name, "mode": mode, "N": n, "d": d, "r": r, "dtype": str(dtype).removeprefix("torch."),
                "dropout": dropout, **t, "peak_mem_MiB": mem / 2**20,
                "tflops": tflops(flops(n, d, d, r, mode), t["median_ms"]),
            })
            x.grad = lora_a.grad = lora_b.grad = None
    for mode in modes:  # speed-up of the fused op over each baseline, same run
        fused_ms = next(row["median_ms"] for row in rows if row["mode"] == mode and row["impl"] == "pdengine-fused")
        for row in rows:
            if row["mode"] == mode:
                row["fused_speedup"] = row["median_ms"] / fused_ms
    return rows


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192 if cuda else 256, help="tokens (rows of x)")
    p.add_argument("--d", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--r", type=int, nargs="+", default=[16, 64, 1024])
    p.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--reps", type=int, default=20 if cuda else 3)
    p.add_argument("--name", default="lora_linear")
    add_save_flag(p)
    args = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    print(environment(), pdengine.backend_info())
    rows = []
    for d in args.d:
        for r in args.r:
            for dropout in args.dropout:
                rows += bench_shape(args.n, d, r, dtype, device, dropout, args.modes,
                                    not args.no_compile, args.warmup, args.reps)
                print_table(rows[-len(args.modes) * (3 - args.no_compile):],
                            ["impl", "mode", "N", "d", "r", "dropout", "median_ms", "tflops",
                             "peak_mem_MiB", "fused_speedup"])
    for row in rows:
        row["backend"] = pdengine.backend_info()["cuda" if cuda else "cpu"]
    print("saved", save_results(args.name, rows, args.save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
