"""The fused LoRA linear on an NF4 base: Triton kernels (interpreter on the CPU) and the
CPU op against the plain-torch reference (dequantize, then the dense reference)."""
import os
import subprocess
import sys

import pytest
import torch

from pdengine import quantize as Q
from pdengine import reference
from tests.conftest import DEVICE

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes import functional as bnbF  # noqa: E402

from pdengine.ops.lora_linear_nf4 import lora_linear_nf4, weight_args  # noqa: E402

SEED = 987654
# (N, d_in, d_out, r): odd sizes (an odd element count: the last byte half used), rank 1,
# rank above d_in, blocks that straddle rows
SHAPES = [(1, 16, 16, 1), (37, 45, 29, 3), (50, 123, 70, 40), (20, 33, 40, 64)]


def _nf4(d_out, d_in, *, nested=True, blocksize=64, seed=0, device="cpu"):
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) * d_in**-0.5
    packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(packed, quant_state=state, bnb_quantized=True, module=layer)
    w = Q.nf4_weight(layer)
    if device != "cpu":
        moved = {f: getattr(w, f).to(device) for f in ("packed", "absmax", "code")}
        nested_w = w.nested and Q.NestedAbsmax(w.nested.quantized.to(device), w.nested.code.to(device),
                                               w.nested.scale.to(device), w.nested.blocksize, w.nested.offset)
        w = Q.NF4Weight(**moved, blocksize=w.blocksize, shape=w.shape, dtype=w.dtype, nested=nested_w or None)
    return w


def _inputs(n, d_in, d_out, r, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    return (randn(n, d_in), randn(r, d_in, std=d_in**-0.5), randn(d_out, r, std=r**-0.5),
            randn(d_out) if bias else None, randn(n, d_out))


def _reference(x, w, lora_a, lora_b, scale, bias, grad_out, dropout, seed):
    """y, dx, dA, dB by autograd in float64 through the dequantized weight."""
    dense = Q.dequantize_nf4(w).to("cpu", torch.float64)
    xr, ar, br = (t.detach().cpu().double().requires_grad_() for t in (x, lora_a, lora_b))
    y = reference.lora_linear(xr, dense, ar, br, scale, None if bias is None else bias.cpu().double(), dropout, seed)
    return (y.detach(), *torch.autograd.grad(y, (xr, ar, br), grad_out.cpu().double()))


def _rel(got, want):
    return ((got.double().cpu() - want.cpu()).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _kernels():
    from pdengine.kernels import lora_linear_nf4 as kernels

    return kernels


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("nested,blocksize", [(True, 64), (False, 64), (True, 128)])
def test_triton_matches_reference_float64(shape, dropout, bias, nested, blocksize):
    n, d_in, d_out, r = shape
    w = _nf4(d_out, d_in, nested=nested, blocksize=blocksize, device=DEVICE)
    x, lora_a, lora_b, b, grad_out = _inputs(n, d_in, d_out, r, torch.float64, DEVICE, bias=bias)
    kernels = _kernels()
    y = kernels.lora_linear_nf4(x, *weight_args(w), lora_a, lora_b, 0.7, b, dropout, SEED)
    grads = kernels.lora_linear_nf4_backward(grad_out, x, *weight_args(w), lora_a, lora_b, 0.7, dropout, SEED)
    want = _reference(x, w, lora_a, lora_b, 0.7, b, grad_out, dropout, SEED)
    for name, got, ref in zip(("y", "dx", "dA", "dB"), (y, *grads), want):
        assert got.shape == ref.shape and got.dtype == torch.float64, name
        assert _rel(got, ref) < 1e-12, name


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_triton_scale_and_no_lora(scale):
    """scale 0 (no LoRA term): y = x Wq^T and dx = dy Wq exactly as the base alone."""
    w = _nf4(29, 45, device=DEVICE)
    x, lora_a, lora_b, b, grad_out = _inputs(37, 45, 29, 3, torch.float64, DEVICE)
    kernels = _kernels()
    y = kernels.lora_linear_nf4(x, *weight_args(w), lora_a, lora_b, scale, b, 0.2, SEED)
    gx, ga, gb = kernels.lora_linear_nf4_backward(grad_out, x, *weight_args(w), lora_a, lora_b, scale, 0.2, SEED)
    want = _reference(x, w, lora_a, lora_b, scale, b, grad_out, 0.2, SEED)
    assert _rel(y, want[0]) < 1e-12 and _rel(gx, want[1]) < 1e-12
    if scale == 0.0:
        dense = Q.dequantize_nf4(w).cpu().double()
        assert _rel(y, x.cpu() @ dense.T + b.cpu()) < 1e-12
        assert ga.abs().max() == 0 and gb.abs().max() == 0


def test_triton_float32_against_float64():
    w = _nf4(50, 70, device=DEVICE)
    x, lora_a, lora_b, b, grad_out = _inputs(45, 70, 50, 24, torch.float32, DEVICE)
    kernels = _kernels()
    y = kernels.lora_linear_nf4(x, *weight_args(w), lora_a, lora_b, 0.7, b, 0.2, SEED)
    grads = kernels.lora_linear_nf4_backward(grad_out, x, *weight_args(w), lora_a, lora_b, 0.7, 0.2, SEED)
    want = _reference(x, w, lora_a, lora_b, 0.7, b, grad_out, 0.2, SEED)
    for name, got, ref in zip(("y", "dx", "dA", "dB"), (y, *grads), want):
        assert got.dtype == torch.float32 and _rel(got, ref) < 1e-5, name


# ------------------------------------------------------------------ the op (CPU path)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_op_autograd_matches_reference(shape, dtype, tol):
    """The public function on CPU tensors (bitsandbytes' decode + the dense C++ kernels)."""
    n, d_in, d_out, r = shape
    w = _nf4(d_out, d_in, seed=1)
    x, lora_a, lora_b, b, grad_out = _inputs(n, d_in, d_out, r, dtype, "cpu", seed=1)
    xr, ar, br = (t.clone().requires_grad_() for t in (x, lora_a, lora_b))
    y = lora_linear_nf4(xr.reshape(1, n, d_in), w, ar, br, 0.7, b, 0.3, SEED).reshape(n, d_out)
    y.backward(grad_out)
    want = _reference(x, w, lora_a, lora_b, 0.7, b, grad_out, 0.3, SEED)
    for name, got, ref in zip(("y", "dx", "dA", "dB"), (y.detach(), xr.grad, ar.grad, br.grad), want):
        assert got.dtype == dtype and _rel(got, ref) < tol, name


def test_op_checks_arguments():
    w = _nf4(29, 45)
    x, lora_a, lora_b, b, _ = _inputs(5, 45, 29, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="must equal the weight's d_in"):
        lora_linear_nf4(x[:, :40], w, lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear_nf4(x, w, lora_a[:, :40], lora_b, 1.0)
    with pytest.raises(ValueError, match="NF4Weight"):
        lora_linear_nf4(x, torch.zeros(29, 45), lora_a, lora_b, 1.0)


def test_opcheck_and_compile():
    w = _nf4(29, 45)
    x, lora_a, lora_b, b, _ = _inputs(7, 45, 29, 3, torch.float32, "cpu")
    args = (x, *weight_args(w), lora_a.requires_grad_(), lora_b.requires_grad_(), 0.7, b, 0.0, 0)
    torch.library.opcheck(torch.ops.pdengine.lora_linear_nf4.default, args)
    compiled = torch.compile(lambda x, a, bb: lora_linear_nf4(x, w, a, bb, 0.7, b), backend="aot_eager", fullgraph=True)
    got = compiled(x, lora_a, lora_b)
    assert _rel(got.detach(), lora_linear_nf4(x, w, lora_a, lora_b, 0.7, b).detach().double()) < 1e-6


# ------------------------------------------------- GPU compilation without a GPU

_AOT_SCRIPT = r"""
import os, re, subprocess, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from pdengine.kernels import lora_linear_nf4 as K

def spill_bytes(ptx):
    with tempfile.TemporaryDirectory() as tmp:  # ptxas -v with the flags Triton's make_cubin passes
        open(os.path.join(tmp, "k.ptx"), "w").write(ptx)
        out = subprocess.run([get_ptxas(90).path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                              os.path.join(tmp, "k.ptx"), "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stdout + out.stderr)
    return int(found.group(1)) + int(found.group(2)) if found else 0

fn = K._nf4_extended_k_kernel
jobs = 0
for dtype, nested, drop, bias in [(torch.bfloat16, True, True, True), (torch.bfloat16, False, False, False),
                                  (torch.float32, True, False, True)]:
    elem = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    block_m, block_n, block_k, warps, stages = K._tiles(dtype, True)  # the shipped configs
    consts = dict(NESTED=nested, W_DTYPE=K._TL_DTYPES[dtype], HAS_BIAS=bias, DROP_OUT=drop,
                  IEEE=dtype == torch.float32, ACC_DTYPE=triton.language.float32, BLOCK_M=block_m,
                  BLOCK_N=block_n // 2 if drop else block_n, BLOCK_K=block_k,
                  BLOCK_R=K._pow2_clamp(64, 16, block_k), GROUP_M=8)
    def arg_type(name):
        if name in ("packed_ptr", "absmax_ptr"):
            return "*u8" if name == "packed_ptr" or nested else "*fp32"
        if name in ("code_ptr", "nested_absmax_ptr", "nested_code_ptr", "bias_ptr"):
            return "*fp32"
        if name.endswith("_ptr"):
            return "*" + elem
        return "fp32" if name in ("nested_offset", "inv_keep") else "i32"
    sig = {n: "constexpr" if n in consts else arg_type(n) for n in fn.arg_names}
    cx = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False))
    print(elem, "nested" if nested else "plain", "dropout" if drop else "", "spill bytes", spill_bytes(kernel.asm["ptx"]))
    jobs += 1
print("compiled", jobs)
"""


def test_kernel_compiles_for_sm90_without_gpu(tmp_path):
    """The interpreter accepts code that compiled Triton rejects: compile the NF4 kernel
    at its shipped tiles for an H100/H200 (sm_90; bf16 and fp32, nested or not, dropout
    and bias on and off) with the ptxas bundled in the Triton wheel, in a process without
    TRITON_INTERPRET, and check that no configuration spills registers."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton build ships no CUDA back-end (ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 3" in out.stdout
    spills = [line for line in out.stdout.splitlines() if "spill bytes" in line and not line.endswith(" 0")]
    assert not spills, spills
