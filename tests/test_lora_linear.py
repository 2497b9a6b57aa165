"""The fused LoRA linear op (Triton and C++ share every case) against the reference."""
import pytest
import torch

import pdengine
from pdengine import reference
from tests.conftest import backend_device, backend_op

SCALE = 0.7
SEED = 1234567

# (N, d_in, d_out, r): rank 1, odd sizes (not multiples of any tile), rank above d_in
SHAPES = [(1, 16, 16, 1), (37, 45, 29, 3), (50, 123, 70, 40), (20, 33, 40, 64)]


def _inputs(n, d_in, d_out, r, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    x = randn(n, d_in)
    weight = randn(d_out, d_in, std=d_in**-0.5)
    lora_a = randn(r, d_in, std=d_in**-0.5)
    lora_b = randn(d_out, r, std=r**-0.5)
    b = randn(d_out) if bias else None
    grad_out = randn(n, d_out)
    return x, weight, lora_a, lora_b, b, grad_out


def _reference_grads(x, weight, lora_a, lora_b, bias, grad_out, dropout, seed):
    """Forward and (dx, dA, dB) of the reference, by autograd in float64."""
    xr, ar, br = (t.detach().double().requires_grad_() for t in (x, lora_a, lora_b))
    y = reference.lora_linear(
        xr, weight.double(), ar, br, SCALE, None if bias is None else bias.double(), dropout, seed
    )
    grads = torch.autograd.grad(y, (xr, ar, br), grad_out.double())
    return (y.detach(), *grads)


def _rel_err(got, want):
    return ((got.double().cpu() - want.cpu()).abs().max() / want.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_float64(backend, shape, dropout, bias):
    device = backend_device(backend)
    x, weight, lora_a, lora_b, b, grad_out = _inputs(*shape, torch.float64, device, bias=bias)
    y = backend_op(backend, "lora_linear")(x, weight, lora_a, lora_b, SCALE, b, dropout, SEED)
    gx, ga, gb = backend_op(backend, "lora_linear_backward")(
        grad_out, x, weight, lora_a, lora_b, SCALE, dropout, SEED
    )
    want = _reference_grads(x, weight, lora_a, lora_b, b, grad_out, dropout, SEED)
    for name, got, ref in zip(("y", "dx", "dA", "dB"), (y, gx, ga, gb), want):
        assert got.shape == ref.shape and got.dtype == torch.float64, name
        assert _rel_err(got, ref) < 1e-12, name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_low_precision_against_float64(backend, dtype, tol):
    """Errors judged against an fp64 ground truth computed from the same rounded inputs."""
    device = backend_device(backend)
    x, weight, lora_a, lora_b, b, grad_out = _inputs(45, 70, 50, 24, dtype, device)
    y = backend_op(backend, "lora_linear")(x, weight, lora_a, lora_b, SCALE, b, 0.2, SEED)
    gx, ga, gb = backend_op(backend, "lora_linear_backward")(
        grad_out, x, weight, lora_a, lora_b, SCALE, 0.2, SEED
    )
    want = _reference_grads(x, weight, lora_a, lora_b, b, grad_out, 0.2, SEED)
    for name, got, ref, inp in zip(("y", "dx", "dA", "dB"), (y, gx, ga, gb), want, (x, x, lora_a, lora_b)):
        assert got.dtype == (x.dtype if name in ("y", "dx") else inp.dtype), name
        assert _rel_err(got, ref) < tol, name


def test_fp32_lora_factors_with_half_input(backend):
    """PEFT keeps adapters in fp32 on a half model: grads come back in the factors' dtype."""
    device = backend_device(backend)
    x, weight, lora_a, lora_b, b, grad_out = _inputs(30, 40, 24, 8, torch.float16, device)
    lora_a, lora_b = lora_a.float(), lora_b.float()
    y = backend_op(backend, "lora_linear")(x, weight, lora_a, lora_b, SCALE, b, 0.0, 0)
    gx, ga, gb = backend_op(backend, "lora_linear_backward")(grad_out, x, weight, lora_a, lora_b, SCALE, 0.0, 0)
    want = _reference_grads(x, weight, lora_a, lora_b, b, grad_out, 0.0, 0)
    assert (y.dtype, gx.dtype, ga.dtype, gb.dtype) == (torch.float16, torch.float16, torch.float32, torch.float32)
    for got, ref in zip((y, gx, ga, gb), want):
        assert _rel_err(got, ref) < 5e-3


def test_dropout_depends_on_seed_only(backend):
    device = backend_device(backend)
    x, weight, lora_a, lora_b, _, _ = _inputs(40, 64, 32, 16, torch.float64, device)
    op = backend_op(backend, "lora_linear")
    y1 = op(x, weight, lora_a, lora_b, SCALE, None, 0.5, 7)
    y2 = op(x, weight, lora_a, lora_b, SCALE, None, 0.5, 7)
    y3 = op(x, weight, lora_a, lora_b, SCALE, None, 0.5, 8)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)


def test_dropout_keep_rate():
    keep = reference.dropout_keep_mask((300, 200), 0.25, seed=3)
    assert abs(keep.double().mean().item() - 0.75) < 0.01


# ------------------------------------------------------------------ public front-end


def _public_inputs(dtype=torch.float64):
    x, weight, lora_a, lora_b, b, _ = _inputs(12, 20, 14, 4, dtype, "cpu")
    return x.reshape(3, 4, 20), weight, lora_a, lora_b, b


def test_public_function_flattens_and_differentiates():
    x, weight, lora_a, lora_b, b = _public_inputs()
    xs, a, bb = (t.clone().requires_grad_() for t in (x, lora_a, lora_b))
    y = pdengine.lora_linear(xs, weight, a, bb, SCALE, b, dropout=0.25, seed=11)
    assert y.shape == (3, 4, 14)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (xs, a, bb), grad)
    xr, ar, br = (t.clone().requires_grad_() for t in (x, lora_a, lora_b))
    yr = reference.lora_linear(xr.reshape(12, 20), weight, ar, br, SCALE, b, 0.25, 11).reshape(3, 4, 14)
    want = torch.autograd.grad(yr, (xr, ar, br), grad)
    torch.testing.assert_close(y, yr)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_seed_none_draws_from_torch_generator():
    x, weight, lora_a, lora_b, _ = _public_inputs()
    torch.manual_seed(5)
    y1 = pdengine.lora_linear(x, weight, lora_a, lora_b, SCALE, dropout=0.5)
    torch.manual_seed(5)
    y2 = pdengine.lora_linear(x, weight, lora_a, lora_b, SCALE, dropout=0.5)
    y3 = pdengine.lora_linear(x, weight, lora_a, lora_b, SCALE, dropout=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_opcheck_cpu():
    x, weight, lora_a, lora_b, b = _public_inputs()
    x2 = x.reshape(12, 20).requires_grad_()
    for bias, p in ((None, 0.0), (b, 0.3)):
        args = (x2, weight, lora_a.requires_grad_(), lora_b.requires_grad_(), SCALE, bias, p, 3)
        torch.library.opcheck(torch.ops.pdengine.lora_linear, args)


def test_compiles_with_torch_compile():
    x, weight, lora_a, lora_b, b = _public_inputs(torch.float32)
    fn = torch.compile(lambda *a: pdengine.lora_linear(*a, dropout=0.0), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x, weight, lora_a, lora_b, SCALE, b), pdengine.lora_linear(x, weight, lora_a, lora_b, SCALE, b))


def test_dropout_without_seed_compiles_fullgraph():
    """A LoRA layer in train mode (dropout, no seed) under torch.compile(fullgraph=True):
    the seed drawn while tracing is a SymInt (was: "Expected int for seed, found SymInt"),
    fresh at every call, and the backward replays the forward's mask."""
    x, weight, lora_a, lora_b, b = _public_inputs(torch.float32)
    x, lora_a, lora_b = (t.clone().requires_grad_(True) for t in (x, lora_a, lora_b))

    def step(x, lora_a, lora_b):
        return pdengine.lora_linear(x, weight, lora_a, lora_b, SCALE, b, dropout=0.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    first, second = compiled(x, lora_a, lora_b), compiled(x, lora_a, lora_b)
    assert not torch.equal(first, second), "each call must draw a new dropout seed"
    first.sum().backward()
    assert x.grad is not None and lora_a.grad is not None and lora_b.grad is not None


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(x=a["x"][..., :-1]), "x's last dimension"),
        (lambda a: a.update(lora_a=a["lora_a"][:, :-1]), "lora_a must have shape"),
        (lambda a: a.update(lora_b=a["lora_b"][:-1]), "lora_b must have shape"),
        (lambda a: a.update(bias=a["bias"][:-1]), "bias must have shape"),
        (lambda a: a.update(weight=a["weight"].float()), "same dtype"),
        (lambda a: a.update(x=a["x"].long()), "x must be a floating tensor"),
        (lambda a: a.update(dropout=1.0), "dropout must be"),
        (lambda a: a.update(scale=torch.tensor(1.0)), "scale must be a Python number"),
        (lambda a: a.update(weight=a["weight"].clone().requires_grad_()), "weight must be frozen"),
        (lambda a: a.update(lora_a=a["lora_a"][:0]), "rank >= 1"),
        (lambda a: a.update(seed=1.5, dropout=0.1), "seed must be an int"),
    ],
)
def test_bad_input_raises_value_error(change, match):
    x, weight, lora_a, lora_b, b = _public_inputs()
    args = dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scale=SCALE, bias=b, dropout=0.0, seed=None)
    change(args)
    with pytest.raises(ValueError, match=match):
        pdengine.lora_linear(**args)


@pytest.mark.parametrize("drop", [False, True])
def test_triton_split_k_reduction(drop):
    """The split-K path (atomics; on a GPU it serves dA/dB) against a plain matmul."""
    from pdengine.kernels import lora_linear as kernels

    device = backend_device("triton")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(24, 200, generator=gen, dtype=torch.float64).to(device)
    x = torch.randn(200, 40, generator=gen, dtype=torch.float64).to(device)
    args = kernels._dropout_args(0.3, SEED) if drop else (0, 0, 1.0)
    out = torch.full((24, 40), 123.0, dtype=torch.float64, device=device)  # must be overwritten
    alpha = 0.5 * args[2]  # callers fold dropout's 1/(1-p) into alpha
    kernels._mm(a, x, out, alpha, drop_b=drop, dropout_args=args, x_cols=40, split_k=3)
    xd = x
    if drop:
        xd = torch.where(reference.dropout_keep_mask(x.shape, 0.3, SEED, device=device), x / 0.7, 0)
    torch.testing.assert_close(out, 0.5 * a @ xd)
