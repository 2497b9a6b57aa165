"""teacher_topk: the Triton kernel and the C++ kernel against the float64 reference.

Each case runs on every backend (see tests/conftest.py). Ties and near-ties make the
exact ids ambiguous, so ids are judged through the reference's values: the returned
ids must be distinct, their float64 log-probs must match the returned ones and be the
k largest (within tolerance); ids must equal the reference's wherever the reference's
top-k values are separated by more than the tolerance.
"""
import math

import pytest
import torch

import pdengine
from pdengine import reference
from conftest import backend_device, backend_op

# (N, d, V, k, temperature, softcap, weight scale, dtype)
CASES = {
    "k1": (37, 123, 1000, 1, 1.0, 0.0, 1.0, torch.float32),
    "k5_temperature": (37, 123, 1000, 5, 2.0, 0.0, 1.0, torch.float32),
    "k64_softcap": (37, 123, 1000, 64, 0.7, 2.5, 1.0, torch.float32),
    "peaked": (37, 123, 1000, 5, 1.0, 0.0, 8.0, torch.float32),
    "peaked_softcap": (21, 64, 777, 64, 2.0, 30.0, 8.0, torch.float32),
    "near_flat": (37, 123, 1000, 64, 1.0, 0.0, 1e-3, torch.float32),
    "fp16": (37, 123, 1000, 5, 2.0, 0.0, 1.0, torch.float16),
    "fp16_softcap_k64": (19, 96, 515, 64, 1.5, 5.0, 1.0, torch.float16),
    "bf16": (37, 123, 1000, 5, 2.0, 0.0, 1.0, torch.bfloat16),
    "fp64_input": (9, 40, 300, 7, 1.0, 0.0, 1.0, torch.float64),
    "k_not_pow2_large": (5, 32, 1000, 200, 2.0, 0.0, 1.0, torch.float32),
    "tiny_vocab_k_eq_v": (3, 8, 5, 5, 1.0, 0.0, 1.0, torch.float32),
}


def _inputs(n, d, vocab, scale, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(d))
    return hidden.to(dtype).to(device), weight.to(dtype).to(device)


def _reference_logprobs(hidden, weight, temperature, softcap):
    """float64 log-probs over the full vocabulary from the (already rounded) inputs."""
    u = reference.student_logits(hidden.double().cpu(), weight.double().cpu(), softcap=softcap or None)
    return torch.log_softmax(u / temperature, dim=-1)


def _assert_is_topk(ids, logprobs, ref_logq, k, atol):
    ids, logprobs = ids.cpu(), logprobs.cpu()
    n, vocab = ref_logq.shape
    assert ids.shape == (n, k) and logprobs.shape == (n, k)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert bool(((ids >= 0) & (ids < vocab)).all())
    assert bool((ids.sort(dim=1).values.diff(dim=1) > 0).all()), "ids repeat within a row"
    assert bool((logprobs.diff(dim=1) <= 0).all()), "not sorted by descending probability"

    chosen = ref_logq.gather(1, ids)
    torch.testing.assert_close(logprobs.double(), chosen, atol=atol, rtol=0)
    ref_values, ref_ids = ref_logq.topk(k, dim=1)
    # the chosen ids are a top-k: their true values are the k largest (up to tolerance)
    torch.testing.assert_close(chosen.sort(dim=1, descending=True).values, ref_values, atol=atol, rtol=0)
    # where the reference's order is unambiguous, the ids themselves must agree
    values = ref_logq.topk(min(k + 1, vocab), dim=1).values
    if k == vocab:
        values = torch.cat([values, torch.full((n, 1), -math.inf, dtype=values.dtype)], dim=1)
    gap_next = -values.diff(dim=1)  # [n, k]: value j minus value j + 1
    gap_prev = torch.cat([torch.full((n, 1), math.inf, dtype=values.dtype), gap_next[:, :-1]], dim=1)
    separated = (gap_prev > 4 * atol) & (gap_next > 4 * atol)
    assert bool((ids[separated] == ref_ids[separated]).all())


def _tolerance(ref_logq, dtype):
    # fp32 accumulation of O(1) products; relative to the size of the log-probs
    scale = max(1.0, float(ref_logq.abs().max()))
    return (2e-5 if dtype != torch.float64 else 1e-5) * scale


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    n, d, vocab, k, temperature, softcap, scale, dtype = CASES[case]
    hidden, weight = _inputs(n, d, vocab, scale, dtype, backend_device(backend))
    ids, logprobs = backend_op(backend, "teacher_topk")(hidden, weight, k, temperature, softcap)
    ref_logq = _reference_logprobs(hidden, weight, temperature, softcap)
    _assert_is_topk(ids, logprobs, ref_logq, k, _tolerance(ref_logq, dtype))


@pytest.mark.parametrize("chunk_v", [384])
def test_many_vocabulary_chunks(backend, monkeypatch, chunk_v):
    """Small vocabulary chunks: top-k candidates and lse partials merged across chunks
    (the last chunk partial); k=64 is larger than a chunk's share of the winners."""
    from pdengine.kernels import teacher_topk as kernel_module

    monkeypatch.setattr(kernel_module, "_CHUNK_V", chunk_v)
    hidden, weight = _inputs(23, 40, 1000, 3.0, torch.float32, backend_device(backend), seed=4)
    ids, logprobs = backend_op(backend, "teacher_topk")(hidden, weight, 64, 1.5, 0.0)
    ref_logq = _reference_logprobs(hidden, weight, 1.5, 0.0)
    _assert_is_topk(ids, logprobs, ref_logq, 64, _tolerance(ref_logq, torch.float32))


def test_large_vocabulary(backend):
    """V above the default chunk size (4096): several chunks with the shipped setting."""
    hidden, weight = _inputs(4, 16, 9000, 4.0, torch.float32, backend_device(backend), seed=6)
    ids, logprobs = backend_op(backend, "teacher_topk")(hidden, weight, 5, 1.0, 0.0)
    ref_logq = _reference_logprobs(hidden, weight, 1.0, 0.0)
    _assert_is_topk(ids, logprobs, ref_logq, 5, _tolerance(ref_logq, torch.float32))


def test_no_tokens(backend):
    device = backend_device(backend)
    ids, logprobs = backend_op(backend, "teacher_topk")(torch.randn(0, 8, device=device), torch.randn(30, 8, device=device), 4, 1.0, 0.0)
    assert ids.shape == (0, 4) and logprobs.shape == (0, 4)


def test_uniform_distribution(backend):
    """All logits equal: every log-prob is -log V and any k distinct ids are right."""
    device = backend_device(backend)
    hidden = torch.randn(6, 20, device=device)
    weight = torch.zeros(300, 20, device=device)
    ids, logprobs = backend_op(backend, "teacher_topk")(hidden, weight, 10, 1.0, 0.0)
    torch.testing.assert_close(logprobs.cpu(), torch.full((6, 10), -math.log(300)), atol=1e-6, rtol=0)
    assert bool((ids.cpu().sort(dim=1).values.diff(dim=1) > 0).all())


def test_strided_inputs(backend):
    """Non-contiguous hidden and weight (every other column) give the same result."""
    device = backend_device(backend)
    hidden, weight = _inputs(11, 90, 400, 1.0, torch.float32, device, seed=3)
    wide_h = torch.zeros(11, 180, device=device)
    wide_h[:, ::2] = hidden
    wide_w = torch.zeros(400, 180, device=device)
    wide_w[:, ::2] = weight
    op = backend_op(backend, "teacher_topk")
    ids, logprobs = op(wide_h[:, ::2], wide_w[:, ::2], 8, 1.3, 0.0)
    ref_logq = _reference_logprobs(hidden, weight, 1.3, 0.0)
    _assert_is_topk(ids, logprobs, ref_logq, 8, _tolerance(ref_logq, torch.float32))


def test_duplicate_rows_tie(backend):
    """Two identical lm_head rows tie exactly; both appear, with equal log-probs."""
    device = backend_device(backend)
    hidden, weight = _inputs(4, 16, 200, 1.0, torch.float32, device, seed=5)
    weight[150] = weight[7]
    hidden = weight[7].expand(4, 16) * 20  # makes row 7 (and 150) the clear favourite
    ids, logprobs = backend_op(backend, "teacher_topk")(hidden.contiguous(), weight, 3, 1.0, 0.0)
    assert bool((ids[:, :2].sort(dim=1).values.cpu() == torch.tensor([7, 150])).all())
    assert bool((logprobs[:, 0] == logprobs[:, 1]).all())


def test_public_function_restores_leading_dims():
    hidden, weight = _inputs(12, 24, 100, 1.0, torch.float32, "cpu", seed=1)
    ids, logprobs = pdengine.teacher_topk(hidden.reshape(3, 4, 24), weight, 6, temperature=2.0, softcap=4.0)
    assert ids.shape == (3, 4, 6) and logprobs.shape == (3, 4, 6)
    ref_ids, ref_lp = reference.teacher_topk(hidden.double(), weight.double(), 6, 2.0, 4.0)
    torch.testing.assert_close(logprobs.reshape(12, 6).double(), ref_lp, atol=2e-5, rtol=0)
    assert not logprobs.requires_grad


def test_public_function_accepts_numpy_scalars():
    import numpy as np

    hidden, weight = _inputs(3, 8, 40, 1.0, torch.float32, "cpu", seed=7)
    ids, logprobs = pdengine.teacher_topk(hidden, weight, np.int64(4), temperature=np.float32(2.0), softcap=np.float64(3.0))
    ref_ids, ref_lp = reference.teacher_topk(hidden.double(), weight.double(), 4, 2.0, 3.0)
    torch.testing.assert_close(logprobs.double(), ref_lp, atol=2e-5, rtol=0)


def test_public_function_no_grad_flows():
    hidden = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    _, logprobs = pdengine.teacher_topk(hidden, weight, 4)
    assert not logprobs.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be"),
        ({"k": 101}, "k must be"),
        ({"k": 2.0}, "k must be an int"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"softcap": -1.0}, "softcap"),
        ({"softcap": float("nan")}, "softcap"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "2"}, "temperature"),
        ({"weight": torch.randn(100, 7)}, "weight's hidden size"),
        ({"weight": torch.randn(100, 8, dtype=torch.float64)}, "weight dtype"),
        ({"weight": torch.randn(100)}, "weight must have shape"),
        ({"hidden": torch.ones(4, 8, dtype=torch.int64)}, "hidden must be a floating-point"),
        ({"hidden": torch.randn(4, 0)}, "hidden must have shape"),
        ({"weight": torch.randn(100, 8, device="meta")}, "weight is on meta"),
        ({"hidden": [[1.0] * 8]}, "hidden must be a torch.Tensor"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(100, 8), "k": 3, "temperature": 1.0, "softcap": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pdengine.teacher_topk(**args)


def test_opcheck_cpu():
    hidden, weight = _inputs(5, 16, 70, 1.0, torch.float32, "cpu", seed=2)
    torch.library.opcheck(torch.ops.pdengine.teacher_topk.default, (hidden, weight, 4, 1.5, 3.0))


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ids, logprobs = torch.ops.pdengine.teacher_topk(torch.empty(7, 16), torch.empty(50, 16), 9, 1.0, 0.0)
    assert ids.shape == (7, 9) and ids.dtype == torch.int64
    assert logprobs.shape == (7, 9) and logprobs.dtype == torch.float32


# Compiled for sm_90 without a GPU, with its resources checked: tests/test_kernel_resources.py.
