"""The Triton kernels on a GPU in bf16, fp16 and fp32 against the float64 reference.

Marked `cuda`: skipped on a machine without one, except in the GPU suite's dry run
(`pdengine bench gpu --dry-run`, which sets PDENGINE_CUDA_TESTS_ON_CPU=1), where the same
cases run at tiny shapes in the Triton interpreter (fp32 and fp16 only: the interpreter has
no bf16 tl.dot). bench/gpu_suite.py runs this file first on the GPU.

Errors are measured as max |got - want| / max |want| over each output (the kernels
accumulate in fp32; the inputs are rounded to the test dtype once, and the reference runs
in float64 on those same rounded values).
"""
import math
import os

import pytest
import torch

from pdengine import reference
from conftest import backend_op

ON_GPU = torch.cuda.is_available()
DRY_RUN = os.environ.get("PDENGINE_CUDA_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (ON_GPU or DRY_RUN), reason="needs a CUDA device (or the GPU suite's dry run)"),
]
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if ON_GPU else [torch.float16, torch.float32]
TOL = {torch.bfloat16: 4e-2, torch.float16: 1e-2, torch.float32: 1e-4}
# (N, d, V, k, r): odd sizes, several tiles of every block config
LOSS_SHAPE = (300, 264, 5003, 16, 24) if ON_GPU else (19, 40, 300, 5, 4)


def _rel_err(got, want):
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape and bool(torch.isfinite(got).all())
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def _loss_inputs(dtype, lora=True):
    n, d, v, k, r = LOSS_SHAPE
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    hidden = torch.randn(n, d, generator=g, dtype=f64).to(dtype).double()
    weight = (torch.randn(v, d, generator=g, dtype=f64) / math.sqrt(d)).to(dtype).double()
    lora_a = (torch.randn(r, d, generator=g, dtype=f64) / math.sqrt(d)).to(dtype).double() if lora else None
    lora_b = (torch.randn(v, r, generator=g, dtype=f64) / math.sqrt(r)).to(dtype).double() if lora else None
    lp, ids = torch.log_softmax(torch.randn(n, v, generator=g, dtype=f64) * 2, -1).topk(k, -1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, lora_a, lora_b, ids, lp.float(), labels


@pytest.mark.parametrize("passes", ["single", "two"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_topk_kl(dtype, passes):
    """Every flag on (LoRA, soft-cap, temperature, tail, CE, ignored tokens), trainable head."""
    hidden, weight, lora_a, lora_b, ids, lp, labels = _loss_inputs(dtype)
    hyper = (0.5, 2.0, 30.0, True, 0.3, -100)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, lora_a, lora_b)]
    want = reference.linear_topk_kl(leaves[0], leaves[1], ids, lp.double(), labels=labels, lora_a=leaves[2],
                                    lora_b=leaves[3], lora_scale=0.5, temperature=2.0, softcap=30.0,
                                    mode="tail", ce_weight=0.3, reduction="none")
    grad_loss = torch.rand(want.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want.backward(grad_loss)
    dev = [None if t is None else t.to(dtype).to(DEVICE) for t in (hidden, weight, lora_a, lora_b)]
    args = (*dev, ids.to(DEVICE), lp.to(DEVICE), labels.to(DEVICE), *hyper)
    gl = grad_loss.float().to(DEVICE)
    if passes == "single":
        loss, *grads = backend_op("triton", "linear_topk_kl_forward_backward")(gl, *args, True)
    else:
        loss, lse = backend_op("triton", "linear_topk_kl")(*args)
        grads = backend_op("triton", "linear_topk_kl_backward")(gl, *args[:7], lse, *args[7:], True)
    tol = TOL[dtype]
    # a KL near 0 is a difference of log-probs of size |lse|: measure the loss against that
    assert (loss.cpu().double() - want.detach()).abs().max().item() <= tol * math.log(LOSS_SHAPE[2]) * 4
    for name, got, leaf in zip(("hidden", "weight", "lora_a", "lora_b"), grads, leaves):
        assert got.dtype == dtype, name
        assert _rel_err(got, leaf.grad) <= tol, f"grad_{name}: {_rel_err(got, leaf.grad):.3g}"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear(dtype, dropout):
    n, d_in, d_out, r = (520, 328, 600, 16) if ON_GPU else (21, 40, 36, 4)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(n, d_in, generator=g), torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    a, b = torch.randn(r, d_in, generator=g) / math.sqrt(d_in), torch.randn(d_out, r, generator=g)
    bias = torch.randn(d_out, generator=g)
    x, w, a, b, bias = (t.to(dtype).double() for t in (x, w, a, b, bias))
    want = reference.lora_linear(x, w, a, b, 0.5, bias, dropout, 7)
    grad_out = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    reference.lora_linear(leaves[0], w, leaves[1], leaves[2], 0.5, bias, dropout, 7).backward(grad_out)
    dev = [t.to(dtype).to(DEVICE) for t in (x, w, a, b, bias)]
    got = backend_op("triton", "lora_linear")(*dev[:4], 0.5, dev[4], dropout, 7)
    assert _rel_err(got, want) <= TOL[dtype]
    grads = backend_op("triton", "lora_linear_backward")(grad_out.to(dtype).to(DEVICE), *dev[:4], 0.5, dropout, 7)
    for name, got_g, leaf in zip(("x", "lora_a", "lora_b"), grads, leaves):
        assert _rel_err(got_g, leaf.grad) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_teacher_topk(dtype):
    """Log-probs of the returned ids match float64; the ids are a top-k up to rounding ties."""
    n, d, v, k = (300, 264, 5003, 64) if ON_GPU else (13, 40, 300, 8)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d) * 4).to(dtype)
    ids, logprobs = backend_op("triton", "teacher_topk")(hidden.to(DEVICE), weight.to(DEVICE), k, 2.0, 0.0)
    full = torch.log_softmax(hidden.double() @ weight.double().T / 2.0, -1)
    at_ids = full.gather(1, ids.cpu())
    assert (logprobs.cpu().double() - at_ids).abs().max().item() <= TOL[dtype] * 10
    kth = full.topk(k, -1).values[:, -1:]
    assert bool((at_ids >= kth - TOL[dtype] * 10).all()), "an id outside the top-k (beyond rounding)"
