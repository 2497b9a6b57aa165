"""The C++ extension pdengine._C: registration, opcheck, memory bound, and the fallback.

Numerical correctness of the C++ kernels is checked by the shared, parametrized cases of
tests/test_linear_topk_kl.py, test_lora_linear.py and test_teacher_topk.py (the `cpp`
backend); this file covers what is specific to the extension.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pdengine
from pdengine import reference
from pdengine.ops import _library

if os.environ.get("PDENGINE_NO_CPP") == "1":
    pytest.skip("PDENGINE_NO_CPP=1: the C++ extension is disabled", allow_module_level=True)
if not _library.HAS_CPP:
    pytest.fail("the C++ extension pdengine._C is not built (run ./run.sh test)", pytrace=False)


def test_cpp_kernels_are_registered_on_the_python_schemas():
    """Every op of _library.SCHEMAS has exactly its Python schema and a C++ CPU kernel
    (csrc/ops.cpp defines no schema of its own; ops without a C++ kernel, such as
    lora_linear_nf4, define theirs in their own front-end)."""
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("pdengine::")}
    assert set(_library.SCHEMAS) <= registered
    for name, schema in _library.SCHEMAS.items():
        op_schema = getattr(torch.ops.pdengine, name).default._schema
        assert str(op_schema) == str(torch._C.parse_schema(f"pdengine::{schema}")), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pdengine::{name}", "CPU"), name
    ops_cpp = (Path(__file__).resolve().parent.parent / "csrc" / "ops.cpp").read_text()
    assert "TORCH_LIBRARY(" not in ops_cpp and "m.def(" not in ops_cpp


_LOAD_ORDER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    if sys.argv[1] == "extension-first":  # the .so's registrations run before any define
        import importlib.util
        torch.ops.load_library(importlib.util.find_spec("pdengine._C").origin)
    import pdengine
    from pdengine.ops import _library
    assert _library.HAS_CPP
    ids, _ = torch.ops.pdengine.teacher_topk(torch.randn(3, 4), torch.randn(20, 4), 2, 1.0, 0.0)
    assert ids.shape == (3, 2)
    print("ok", pdengine.backend_info()["cpu"])
""")


@pytest.mark.parametrize("order", ["extension-first", "python-first"])
def test_extension_loads_before_or_after_the_python_schemas(order):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _LOAD_ORDER_SCRIPT, order], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok cpp")


def test_setup_lets_torch_choose_the_cxx_standard():
    """torch >= 2.14's ATen needs C++20: a -std flag of our own would break its build."""
    setup_py = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert "-std=" not in setup_py


def test_extension_is_an_importable_module():
    from pdengine import _C

    assert _C.__name__ == "pdengine._C"
    assert pdengine.backend_info()["cpu"] == "cpp"


# ------------------------------------------------------------------------------ opcheck


def _loss_args(requires_grad, lora=True, labels=True, softcap=3.0, tail=True):
    g = torch.Generator().manual_seed(0)
    n, d, v, k, r = 6, 8, 300, 4, 2  # v spans two vocabulary tiles (one short)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)

    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.2
    lab = torch.randint(0, v, (n,), generator=g)
    lab[1] = -100
    return (rand(n, d), rand(v, d), rand(r, d) if lora else None, rand(v, r) if lora else None,
            ids, lp, lab if labels else None, 0.5, 2.0, softcap, tail, 0.3, -100)


@pytest.mark.parametrize("lora,labels,tail", [(True, True, True), (False, False, False)])
def test_opcheck_linear_topk_kl(lora, labels, tail):
    args = _loss_args(True, lora=lora, labels=labels, tail=tail)
    torch.library.opcheck(torch.ops.pdengine.linear_topk_kl.default, args)
    plain = _loss_args(False, lora=lora, labels=labels, tail=tail)
    loss, lse = torch.ops.pdengine.linear_topk_kl(*plain)
    grad_loss = torch.rand(loss.shape[0])
    bwd = (grad_loss, *plain[:7], lse, *plain[7:], True)
    torch.library.opcheck(torch.ops.pdengine.linear_topk_kl_backward.default, bwd)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_opcheck_lora_linear(dropout):
    g = torch.Generator().manual_seed(1)
    x, w, a, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 7), (6, 7), (3, 7), (6, 3)))
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    for t in (x, a, b):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.pdengine.lora_linear.default, (x, w, a, b, 0.5, bias, dropout, 7))
    grad_out = torch.randn(5, 6, dtype=torch.float64)
    plain = [t.detach() for t in (x, w, a, b)]
    torch.library.opcheck(torch.ops.pdengine.lora_linear_backward.default,
                          (grad_out, *plain, 0.5, dropout, 7))


def test_opcheck_teacher_topk():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(300, 8, generator=g)
    torch.library.opcheck(torch.ops.pdengine.teacher_topk.default, (hidden, weight, 6, 1.5, 0.0))


# ------------------------------------------------------------------ C++-specific checks


def test_bad_arguments_raise_value_error_naming_them():
    """The raw C++ op checks its own arguments (ValueError, not a crash or a deep error)."""
    args = list(_loss_args(False))
    op = torch.ops.pdengine.linear_topk_kl
    bad_ids = args[4].clone()
    bad_ids[0, 0] = 300  # == V
    with pytest.raises(ValueError, match="teacher_ids"):
        op(*args[:4], bad_ids, *args[5:])
    with pytest.raises(ValueError, match="temperature"):
        op(*args[:8], -1.0, *args[9:])
    with pytest.raises(ValueError, match="lora_b"):
        op(args[0], args[1], args[2], args[3][:, :1], *args[4:])
    x, w, a, b = torch.randn(4, 5), torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    with pytest.raises(ValueError, match="dropout"):
        torch.ops.pdengine.lora_linear(x, w, a, b, 1.0, None, 1.0, 0)
    with pytest.raises(ValueError, match="k must be"):
        torch.ops.pdengine.teacher_topk(x, w, 7, 1.0, 0.0)


def test_tail_clamp_matches_reference_in_float64():
    """Student mass outside the teacher's top-k below TAIL_MASS_EPS: clamp and zero tail grad."""
    n, d, v, k = 3, 4, 40, 2
    hidden = torch.zeros(n, d, dtype=torch.float64)
    hidden[:, 0] = 40.0
    weight = torch.zeros(v, d, dtype=torch.float64)
    weight[:k, 0] = 1.0  # ids 0 and 1 take all but ~e^-40 of the student's mass
    ids = torch.arange(k).repeat(n, 1)
    lp = torch.log(torch.full((n, k), 0.3, dtype=torch.float64))  # R = 0.4 > 0
    h = hidden.clone().requires_grad_(True)
    want = reference.linear_topk_kl(h, weight, ids, lp, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), h)
    loss, lse = torch.ops.pdengine.linear_topk_kl(hidden, weight, None, None, ids, lp, None, 1.0,
                                                  1.0, 0.0, True, 0.0, -100)
    lse64 = torch.logsumexp(hidden @ weight.T, -1)  # the op's lse output is float32 (contract)
    torch.testing.assert_close(lse, lse64.float())
    grads = torch.ops.pdengine.linear_topk_kl_backward(torch.ones(n), hidden, weight, None, None,
                                                       ids, lp, None, lse64, 1.0, 1.0, 0.0, True,
                                                       0.0, -100, False)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-6)
    # unclamped, the tail term's gradient would carry R / S ~ 1e16
    torch.testing.assert_close(grads[0], want_grad, rtol=1e-9, atol=1e-9)
    assert grads[1].numel() == 0 and grads[2].numel() == 0 and grads[3].numel() == 0


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _peak_added_bytes(fn):
    """Peak of live bytes allocated while fn runs: every allocation and free the profiler
    saw, in time order. One thread, so the profiler also sees what at::parallel_for's
    workers allocate."""
    from torch._C._profiler import _EventType

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted((node.start_time_ns, node.extra_fields.alloc_size)
                         for node in _walk(tree) if node.tag == _EventType.Allocation)
    live = peak = 0
    for _, size in allocations:
        live += size
        peak = max(peak, live)
    return peak


def test_fwd_bwd_peak_memory_is_bounded_by_tiles():
    """C++ fwd + bwd (with weight and LoRA grads) never holds anything near [N, V]."""
    n, d, v, k, r = 1024, 4, 8192, 4, 2
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    lora_a, lora_b = torch.randn(r, d, generator=g), torch.randn(v, r, generator=g)
    ids = torch.randint(0, v, (n, k), generator=g)
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    hyper = (0.5, 2.0, 3.0, True, 0.5, -100)
    logits_bytes = n * v * 4  # 32 MiB; inputs and grads are all V*d or N*d sized (<= 128 KiB)

    def cpp():
        loss, lse = torch.ops.pdengine.linear_topk_kl(hidden, weight, lora_a, lora_b, ids, lp,
                                                      labels, *hyper)
        torch.ops.pdengine.linear_topk_kl_backward(torch.ones(n), hidden, weight, lora_a, lora_b,
                                                   ids, lp, labels, lse, *hyper, True)

    def materialized():
        w = weight.clone().requires_grad_(True)
        reference.linear_topk_kl(hidden, w, ids, lp, labels=labels, lora_a=lora_a, lora_b=lora_b,
                                 lora_scale=0.5, temperature=2.0, softcap=3.0,
                                 ce_weight=0.5).backward()

    assert _peak_added_bytes(materialized) >= logits_bytes  # the probe does see [N, V]
    peak = _peak_added_bytes(cpp)
    assert peak < logits_bytes // 8, f"C++ peak {peak} B vs one [N, V] fp32 tensor {logits_bytes} B"


# ----------------------------------------------------------------------- the fallback


def test_without_extension_import_works_and_first_cpu_call_warns_once():
    code = textwrap.dedent("""
        import warnings
        import torch
        import pdengine
        from pdengine.ops import _library
        assert not _library.HAS_CPP
        assert pdengine.backend_info()["cpu"] == "torch-reference", pdengine.backend_info()
        hidden, weight = torch.randn(3, 4), torch.randn(20, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, _ = torch.ops.pdengine.teacher_topk(hidden, weight, 2, 1.0, 0.0)
            torch.ops.pdengine.teacher_topk(hidden, weight, 2, 1.0, 0.0)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert "torch-reference" in messages[0] and "pdengine._C" in messages[0], messages[0]
        assert ids.shape == (3, 2)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PDENGINE_NO_CPP"] = "1"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
