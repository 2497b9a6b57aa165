"""linear_topk_kl: the Triton and C++ kernels and the public API against the float64 reference.

Kernel cases run on every backend (tests/conftest.py): the inputs are rounded to the
kernel dtype once, and the reference runs in float64 on those same values, so the error
measured is the kernel's own (fp32 accumulation) and not the input rounding.
"""
import math

import pytest
import torch

import pdengine
from pdengine import reference
from pdengine.ops import _library
from conftest import backend_device, backend_op

N, D, V = 37, 123, 1000

# name -> (k, mode, temperature, softcap, LoRA rank (0: none), ce_weight, ignored, teacher,
#          dtype, weight grad); rank 80 spans two of the kernel's rank chunks
# teacher: "random" (flat-ish), "peaked" (near one-hot teacher), "clamp" (a very peaked
# student whose mass lies inside a perturbed copy's top-k, so S = 1 - sum q[ids] falls
# below TAIL_MASS_EPS while teacher and student still disagree: real gradients).
CASES = {
    "k1_ce_only": (1, "tail", 1.0, 0.0, 0, 1.0, True, "random", torch.float32, True),
    "k5_tail": (5, "tail", 1.0, 0.0, 0, 0.0, False, "random", torch.float32, True),
    "k5_renorm_temperature": (5, "renorm", 2.0, 0.0, 0, 0.0, True, "random", torch.float32, True),
    "k64_tail_softcap_lora": (64, "tail", 2.0, 3.0, 80, 0.0, False, "random", torch.float32, True),
    "k64_renorm_lora_ce_ignored": (64, "renorm", 1.0, 0.0, 4, 0.5, True, "peaked", torch.float32, False),
    "k5_tail_peaked_ce": (5, "tail", 0.5, 0.0, 0, 0.3, True, "peaked", torch.float32, True),
    "k64_tail_clamped_S": (64, "tail", 1.0, 0.0, 0, 0.0, False, "clamp", torch.float32, True),
    "k5_all_flags_fp16": (5, "tail", 2.0, 5.0, 4, 0.5, True, "random", torch.float16, True),
    "k5_fp64_input_no_wgrad": (5, "renorm", 1.5, 0.0, 4, 0.0, False, "random", torch.float64, False),
}
# max |error| <= TOL * max |reference| (+ a tiny floor for all-zero references)
TOL = {torch.float32: 2e-5, torch.float64: 2e-5, torch.float16: 2e-2}


def _teacher(logits, k, temperature, kind, generator):
    """Teacher top-k ids and full-vocabulary log-probs [N, k] (float32, like the cache)."""
    if kind == "random":
        t = torch.randn(logits.shape, generator=generator, dtype=torch.float64) * 2
    elif kind == "peaked":
        t = torch.randn(logits.shape, generator=generator, dtype=torch.float64) * 12
    else:  # "clamp": a perturbed copy of the (very peaked) student logits
        t = logits + 20 * torch.randn(logits.shape, generator=generator, dtype=torch.float64)
    lp, ids = torch.log_softmax(t / temperature, dim=-1).topk(k, dim=-1)
    return ids, lp.float()


def _make_inputs(k, temperature, softcap, lora, ignored, teacher, dtype, device, seed=0, n=N, d=D, v=V):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    h_scale = 100.0 if teacher == "clamp" else 1.0  # "clamp" needs a very peaked student
    hidden = torch.randn(n, d, generator=g, dtype=f64) * h_scale
    weight = torch.randn(v, d, generator=g, dtype=f64) / math.sqrt(d)
    lora_a = torch.randn(lora, d, generator=g, dtype=f64) / math.sqrt(d) if lora else None
    lora_b = torch.randn(v, lora, generator=g, dtype=f64) * (2 / math.sqrt(lora)) if lora else None
    logits = reference.student_logits(hidden, weight, lora_a, lora_b, 0.5, softcap or None)
    ids, lp = _teacher(logits, k, temperature, teacher, g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1::3] = ids[1::3, 0]  # a label that is also a teacher id: both terms hit one row
    if ignored:
        labels[::4] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return dict(hidden=cast(hidden), weight=cast(weight), lora_a=cast(lora_a), lora_b=cast(lora_b),
                ids=ids.to(device), lp=lp.to(device), labels=labels.to(device))


def _reference(x, k_mode, temperature, softcap, ce_weight, weight_grad, grad_loss):
    """Loss [N] and gradients of the float64 reference on the (rounded) kernel inputs."""
    leaves = {n: (None if x[n] is None else x[n].detach().cpu().double().requires_grad_(True))
              for n in ("hidden", "weight", "lora_a", "lora_b")}
    loss = reference.linear_topk_kl(
        leaves["hidden"], leaves["weight"], x["ids"].cpu(), x["lp"].cpu().double(),
        labels=x["labels"].cpu(), lora_a=leaves["lora_a"], lora_b=leaves["lora_b"], lora_scale=0.5,
        temperature=temperature, softcap=softcap or None, mode=k_mode, ce_weight=ce_weight,
        reduction="none")
    loss.backward(grad_loss.cpu().double())
    grads = {n: (t.grad if t is not None else None) for n, t in leaves.items()}
    if not weight_grad:
        grads["weight"] = None
    return loss.detach(), grads


def _assert_close(name, got, want, tol, scale=0.0):
    """max |got - want| <= tol * max(max |want|, scale); `scale` is the size of the terms
    that cancel into `want` (a KL near 0 is a difference of log-probs of size |lse|)."""
    assert got is not None and want is not None, name
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert bool(torch.isfinite(got).all()), f"{name}: non-finite values"
    err = (got.cpu().double() - want).abs().max().item()
    scale = max(want.abs().max().item(), scale)
    assert err <= tol * scale + 1e-9, f"{name}: max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("passes", ["two", "single"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(backend, case, passes, monkeypatch):
    """passes="two": the forward op, then the backward op from its lse. passes="single":
    linear_topk_kl_forward_backward, with the C++ chunk budget and the Triton kept-tile
    budget shrunk so that the N = 37 tokens take several chunks and a short last one."""
    k, mode, temp, cap, lora, ce, ignored, teacher, dtype, wgrad = CASES[case]
    device = backend_device(backend)
    x = _make_inputs(k, temp, cap, lora, ignored, teacher, dtype, device)
    labels = x["labels"] if (ce or ignored) else None
    if labels is None:
        x["labels"] = torch.randint(0, V, (N,), device=device)  # reference: no label counts as kept
    args = (x["hidden"], x["weight"], x["lora_a"], x["lora_b"], x["ids"], x["lp"], labels, 0.5,
            temp, cap, mode == "tail", ce, -100)
    grad_loss = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(device)
    if passes == "two":
        loss, lse = backend_op(backend, "linear_topk_kl")(*args)
        grads = backend_op(backend, "linear_topk_kl_backward")(grad_loss, *args[:7], lse, *args[7:], wgrad)
    else:
        monkeypatch.setenv("PDENGINE_CPU_CHUNK_BYTES", str(16 * V * 8))  # 16 or 32 token rows
        # Triton: kept tiles for one 32-row token block per chunk (chunks of 32 and 5 rows)
        monkeypatch.setenv("PDENGINE_KEPT_TILE_BYTES", str(32 * V * 2))
        loss, *grads = backend_op(backend, "linear_topk_kl_forward_backward")(grad_loss, *args, wgrad)

    ref_loss, ref_grads = _reference(x, mode, temp, cap, ce if labels is not None else 0.0, wgrad, grad_loss)
    tol = TOL[dtype]
    assert loss.dtype == torch.float32
    u = reference.student_logits(x["hidden"].cpu().double(), x["weight"].cpu().double(), *(
        (x["lora_a"].cpu().double(), x["lora_b"].cpu().double(), 0.5) if lora else ()), softcap=cap or None)
    ref_lse = torch.logsumexp(u / temp, dim=-1)
    if passes == "two":
        assert lse.dtype == torch.float32
        _assert_close("lse", lse, ref_lse, tol)
    _assert_close("loss", loss, ref_loss, tol, scale=ref_lse.abs().max().item())
    if ignored:
        assert bool((loss.cpu()[x["labels"].cpu() == -100] == 0).all()), "ignored tokens must have loss 0"
    grad_h, grad_w, grad_a, grad_b = grads
    assert grad_h.dtype == dtype
    _assert_close("grad_hidden", grad_h, ref_grads["hidden"], tol)
    if wgrad:
        assert grad_w.dtype == dtype
        _assert_close("grad_weight", grad_w, ref_grads["weight"], tol)
    else:
        assert grad_w.numel() == 0, "grad_weight must be empty when needs_weight_grad is False"
    if lora:
        _assert_close("grad_lora_a", grad_a, ref_grads["lora_a"], tol)
        _assert_close("grad_lora_b", grad_b, ref_grads["lora_b"], tol)
    else:
        assert grad_a.numel() == 0 and grad_b.numel() == 0


def test_clamped_case_really_clamps():
    """The "clamp" case must drive S below TAIL_MASS_EPS, else it tests nothing special."""
    x = _make_inputs(64, 1.0, 0.0, 0, False, "clamp", torch.float64, "cpu")
    u = reference.student_logits(x["hidden"], x["weight"])
    q_ids = torch.softmax(u, dim=-1).gather(1, x["ids"])
    assert float((1 - q_ids.sum(-1)).max()) < reference.TAIL_MASS_EPS


def test_kernel_eps_matches_reference():
    from pdengine.kernels import linear_topk_kl as kernels

    assert kernels.TAIL_MASS_EPS == reference.TAIL_MASS_EPS


def test_kernel_all_ignored_gives_zero(backend):
    device = backend_device(backend)
    fwd, bwd = backend_op(backend, "linear_topk_kl"), backend_op(backend, "linear_topk_kl_backward")
    x = _make_inputs(5, 1.0, 0.0, 4, False, "random", torch.float32, device, n=9, d=20, v=300)
    labels = torch.full((9,), -100, device=device)
    args = (x["hidden"], x["weight"], x["lora_a"], x["lora_b"], x["ids"], x["lp"], labels, 0.5,
            1.0, 0.0, True, 0.5, -100)
    loss, lse = fwd(*args)
    grads = bwd(torch.ones(9, device=device), *args[:7], lse, *args[7:], True)
    assert bool((loss == 0).all())
    for g in grads:
        assert bool((g == 0).all()), "ignored tokens must give exactly zero gradients"


# ----------------------------------------------------------------------- public API


def _api_inputs(seed=0, lead=(3, 5), d=24, v=200, k=6, lora=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, d, generator=g, dtype=torch.float64).float()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)).float()
    lp, ids = torch.log_softmax(torch.randn(*lead, v, generator=g) * 2, dim=-1).topk(k, dim=-1)
    labels = torch.randint(0, v, lead, generator=g)
    labels.view(-1)[::3] = -100
    out = dict(hidden=hidden, weight=weight, teacher_ids=ids, teacher_logprobs=lp, labels=labels)
    if lora:
        out["lora_a"] = torch.randn(3, d, generator=g) / math.sqrt(d)
        out["lora_b"] = torch.randn(v, 3, generator=g) * 0.5
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_api_autograd_matches_reference(reduction):
    x = _api_inputs()
    kw = dict(lora_scale=0.5, temperature=2.0, softcap=4.0, mode="tail", ce_weight=0.25, reduction=reduction)
    trainable = ("hidden", "weight", "lora_a", "lora_b")
    ours = {n: (x[n].clone().requires_grad_(True) if n in trainable else x[n]) for n in x}
    ref = {n: (x[n].double().requires_grad_(True) if n in trainable else x[n]) for n in x}
    ref["teacher_logprobs"] = x["teacher_logprobs"].double()
    out = pdengine.linear_topk_kl(**ours, **kw)
    want = reference.linear_topk_kl(**ref, **kw)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert out.shape == ((15,) if reduction == "none" else ())
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-6)
    weights = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (want * weights).sum().backward()
    for n in trainable:
        torch.testing.assert_close(ours[n].grad.double(), ref[n].grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("softcap", [None, 4.0])  # the C++ single pass keeps exps / logits
def test_single_pass_and_two_pass_agree(softcap):
    """A reduced loss with grad enabled takes the single pass; reduction="none" + sum takes
    forward + backward. Same value and gradients, a scaled grad_out included."""
    x = _api_inputs(lead=(40,), v=300)
    kw = dict(lora_scale=0.5, temperature=2.0, softcap=softcap, ce_weight=0.25)
    trainable = ("hidden", "weight", "lora_a", "lora_b")
    results = []
    for reduction in ("mean", "none"):
        leaves = {n: (x[n].clone().requires_grad_(True) if n in trainable else x[n]) for n in x}
        loss = pdengine.linear_topk_kl(**leaves, **kw, reduction=reduction)
        if reduction == "none":
            loss = loss.sum() / (x["labels"] != -100).sum()
        (3.0 * loss).backward()
        results.append((loss.detach(), [leaves[n].grad for n in trainable]))
    (single, single_grads), (two, two_grads) = results
    torch.testing.assert_close(single, two)
    for name, a, b in zip(trainable, single_grads, two_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_single_pass_backward_through_a_retained_graph():
    """Three backwards through one graph accumulate exactly three times the gradients."""
    x = _api_inputs()
    trainable = ("hidden", "weight", "lora_a", "lora_b")
    for n in trainable:
        x[n].requires_grad_(True)
    loss = pdengine.linear_topk_kl(**x, ce_weight=0.5)
    loss.backward(retain_graph=True)
    once = {n: x[n].grad.clone() for n in trainable}
    loss.backward(retain_graph=True)
    loss.backward()
    for n in trainable:
        torch.testing.assert_close(x[n].grad, 3 * once[n], msg=n)


def test_single_pass_only_when_gradients_are_wanted(monkeypatch):
    """No gradient work under no_grad, with nothing trainable, or for reduction="none"."""
    calls = []
    real = torch.ops.pdengine.linear_topk_kl_forward_backward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(torch.ops.pdengine, "linear_topk_kl_forward_backward", spy)
    x = _api_inputs()
    pdengine.linear_topk_kl(**x)  # nothing requires grad
    with torch.no_grad():
        pdengine.linear_topk_kl(**{**x, "hidden": x["hidden"].requires_grad_(True)})
    pdengine.linear_topk_kl(**x, reduction="none")
    assert not calls
    pdengine.linear_topk_kl(**x).backward()
    assert calls == [1]


@pytest.mark.parametrize("value", ["", "32MB", "-1", "0"])
def test_bad_chunk_budget_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("PDENGINE_CPU_CHUNK_BYTES", value)
    x = _api_inputs()
    x["hidden"].requires_grad_(True)
    with pytest.raises(ValueError, match="PDENGINE_CPU_CHUNK_BYTES must be a positive whole number"):
        pdengine.linear_topk_kl(**x)


def test_public_api_frozen_weight_and_module():
    x = _api_inputs(lora=False)
    hidden = x["hidden"].requires_grad_(True)
    loss_fn = pdengine.LinearTopKKL(temperature=1.5, mode="renorm")
    loss = loss_fn(hidden, x["weight"], x["teacher_ids"], x["teacher_logprobs"], labels=x["labels"])
    loss.backward()
    want = reference.linear_topk_kl(x["hidden"].double(), x["weight"], x["teacher_ids"], x["teacher_logprobs"],
                                    labels=x["labels"], temperature=1.5, mode="renorm")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert x["weight"].grad is None and hidden.grad is not None


def test_public_api_all_ignored_is_zero_not_nan():
    x = _api_inputs()
    x["labels"].fill_(-100)
    for n in ("hidden", "weight", "lora_a", "lora_b"):
        x[n].requires_grad_(True)
    for reduction in ("mean", "sum"):
        loss = pdengine.linear_topk_kl(**x, ce_weight=1.0, reduction=reduction)
        assert loss.item() == 0.0
        grads = torch.autograd.grad(loss, [x["hidden"], x["weight"], x["lora_a"], x["lora_b"]])
        for g in grads:
            assert bool((g == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_public_api_empty_batch(reduction):
    """N = 0 (an empty micro-batch): loss 0, empty hidden grad, zero weight grad."""
    x = _api_inputs(lead=(0,))
    for n in ("hidden", "weight", "lora_a", "lora_b"):
        x[n].requires_grad_(True)
    loss = pdengine.linear_topk_kl(**x).sum()
    loss.backward()
    assert loss.item() == 0.0
    assert x["hidden"].grad.shape == x["hidden"].shape
    assert all(bool((x[n].grad == 0).all()) for n in ("weight", "lora_a", "lora_b"))


def _bad(**changes):
    x = _api_inputs()
    x.update(changes)
    return x


BAD_INPUTS = {
    "hidden_width": (lambda: _bad(hidden=torch.randn(3, 5, 7)), "hidden"),
    "dtype_mismatch": (lambda: _bad(hidden=torch.randn(3, 5, 24, dtype=torch.float64)), "dtype"),
    "ids_shape": (lambda: _bad(teacher_ids=torch.zeros(4, 6, dtype=torch.long)), "teacher_ids"),
    "ids_float": (lambda: _bad(teacher_ids=torch.zeros(3, 5, 6)), "teacher_ids"),
    "ids_out_of_range": (lambda: _bad(teacher_ids=torch.full((3, 5, 6), 200)), "teacher_ids"),
    "ids_negative": (lambda: _bad(teacher_ids=torch.full((3, 5, 6), -1)), "teacher_ids"),
    "k_gt_v": (lambda: _bad(teacher_ids=torch.zeros(3, 5, 201, dtype=torch.long),
                            teacher_logprobs=torch.zeros(3, 5, 201)), "k"),
    "logprobs_shape": (lambda: _bad(teacher_logprobs=torch.zeros(3, 5, 5)), "teacher_logprobs"),
    "logprobs_nan": (lambda: _bad(teacher_logprobs=torch.full((3, 5, 6), float("nan"))), "teacher_logprobs"),
    "logprobs_inf": (lambda: _bad(teacher_logprobs=torch.full((3, 5, 6), float("-inf"))), "teacher_logprobs"),
    "labels_shape": (lambda: _bad(labels=torch.zeros(14, dtype=torch.long)), "labels"),
    "labels_out_of_range": (lambda: {**_bad(labels=torch.full((3, 5), 500)), "ce_weight": 1.0}, "labels"),
    "lora_a_without_b": (lambda: {**_bad(), "lora_b": None}, "lora_a and lora_b"),
    "lora_b_shape": (lambda: _bad(lora_b=torch.zeros(199, 3)), "lora_b"),
    "temperature_zero": (lambda: {**_bad(), "temperature": 0.0}, "temperature"),
    "softcap_negative": (lambda: {**_bad(), "softcap": -1.0}, "softcap"),
    "unknown_mode": (lambda: {**_bad(), "mode": "reverse"}, "mode"),
    "unknown_reduction": (lambda: {**_bad(), "reduction": "max"}, "reduction"),
    "ce_weight_negative": (lambda: {**_bad(), "ce_weight": -1.0}, "ce_weight"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    make, name = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=name):
        pdengine.linear_topk_kl(**make())


def test_validate_false_skips_value_checks_only():
    x = _api_inputs()
    x["teacher_logprobs"] = x["teacher_logprobs"].clone()
    x["teacher_logprobs"][0, 1, 0] = float("nan")  # token 1 is counted
    # no value check, no error (what a backend makes of a NaN log-prob is unspecified)
    assert pdengine.linear_topk_kl(**x, validate=False).shape == ()
    with pytest.raises(ValueError, match="teacher_logprobs"):
        pdengine.linear_topk_kl(**x)
    with pytest.raises(ValueError, match="temperature"):
        pdengine.linear_topk_kl(**x, temperature=-1.0, validate=False)


# ------------------------------------------------------------- op-level integration


def _op_args(seed=0, lora=True, labels=True):
    x = _api_inputs(seed=seed, lead=(7,), d=16, v=96, k=4, lora=lora)
    return (x["hidden"], x["weight"], x.get("lora_a"), x.get("lora_b"), x["teacher_ids"],
            x["teacher_logprobs"], x["labels"] if labels else None, 0.5, 2.0, 3.0, True, 0.3, -100)


@pytest.mark.parametrize("lora,labels", [(True, True), (False, False)])
def test_opcheck(lora, labels):
    args = list(_op_args(lora=lora, labels=labels))
    for i in (0, 1, 2, 3):
        if args[i] is not None:
            args[i] = args[i].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.pdengine.linear_topk_kl.default, tuple(args))
    loss, lse = torch.ops.pdengine.linear_topk_kl(*args)
    bwd_args = (torch.ones_like(loss), *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:7]],
                lse.detach(), *args[7:], True)
    torch.library.opcheck(torch.ops.pdengine.linear_topk_kl_backward.default, bwd_args)
    torch.library.opcheck(torch.ops.pdengine.linear_topk_kl_forward_backward.default,
                          (bwd_args[0], *bwd_args[1:8], *bwd_args[9:]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    """Both paths trace: the single pass (a reduced loss) and forward + backward."""
    x = _api_inputs()
    for n in ("hidden", "lora_a", "lora_b"):
        x[n].requires_grad_(True)

    def step(**kw):
        return pdengine.linear_topk_kl(**kw, temperature=2.0, ce_weight=0.5, reduction=reduction).sum()

    # aot_eager traces exactly what inductor traces (dynamo + AOT autograd through the fake
    # kernel and the registered autograd); inductor itself also works here but spends
    # ~45 s compiling C++ on the 2-core CI machine.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(**x)
    g_got = torch.autograd.grad(got, [x["hidden"], x["lora_a"], x["lora_b"]])
    want = step(**x)
    g_want = torch.autograd.grad(want, [x["hidden"], x["lora_a"], x["lora_b"]])
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def _largest_allocation(fn):
    """Largest CPU memory (bytes) any single op allocates for itself while fn runs.

    The profiler charges each allocation to the innermost op that made it
    (`self_cpu_memory_usage`, net of frees inside that op): an upper bound on the largest
    single allocation, C++ kernels' at::empty included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.name != "[memory]"]
    return max(sizes, default=0)


def test_no_logits_sized_allocation(monkeypatch):
    """Forward + backward through the public API never allocates an [N, V] tensor, in the
    two-pass path (reduction="none") nor in the single pass (reduced loss), whose kept
    logit tiles are bounded by PDENGINE_CPU_CHUNK_BYTES (32 MiB by default; shrunk here
    to an eighth of [N, V], as a long batch would face the default).

    Shapes make N*V far larger than every legitimate buffer (W and its grad are V*d, the
    hidden grad N*d), and the reference run on the same inputs proves the measurement
    does see an [N, V] allocation when there is one.
    """
    n, d, v, k = 16, 2, 16384, 4
    x = _api_inputs(lead=(n,), d=d, v=v, k=k)
    for name in ("hidden", "weight", "lora_a", "lora_b"):
        x[name].requires_grad_(True)
    logits_bytes = n * v * 4
    monkeypatch.setenv("PDENGINE_CPU_CHUNK_BYTES", str(logits_bytes // 8))

    def fused():
        pdengine.linear_topk_kl(**x, ce_weight=0.5, validate=False).backward()
        pdengine.linear_topk_kl(**x, ce_weight=0.5, validate=False, reduction="none").sum().backward()

    def materialized():
        reference.linear_topk_kl(**x, ce_weight=0.5).backward()

    materialized()  # warm-up of lazy state
    fused()
    assert _largest_allocation(materialized) >= logits_bytes  # the probe sees [N, V]
    largest = _largest_allocation(fused)
    assert largest < logits_bytes // 4, f"largest allocation {largest} B vs [N, V] = {logits_bytes} B"


# GPU compilation without a GPU (every kernel, every shipped config, spills and shared
# memory included): tests/test_kernel_resources.py.


@pytest.mark.parametrize("value", ["", "2GB", "-1", "0"])
def test_bad_kept_tile_budget_is_a_clear_error(monkeypatch, value):
    """The Triton single pass's kept-tile budget (a trainable lm_head keeps its tiles)."""
    monkeypatch.setenv("PDENGINE_KEPT_TILE_BYTES", value)
    x = _api_inputs(lora=False)
    args = (x["hidden"].reshape(15, -1), x["weight"], None, None, x["teacher_ids"].reshape(15, -1),
            x["teacher_logprobs"].reshape(15, -1), None, 1.0, 1.0, 0.0, True, 0.0, -100)
    with pytest.raises(ValueError, match="PDENGINE_KEPT_TILE_BYTES must be a positive whole number"):
        backend_op("triton", "linear_topk_kl_forward_backward")(torch.ones(15), *args, True)
