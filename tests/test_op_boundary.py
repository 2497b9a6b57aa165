"""The raw ops check their arguments at one boundary, alike on every backend.

One list of malformed raw-op calls (schema arguments, as a caller of torch.ops.pdengine.*
passes them) is run against the C++ kernels and against the Triton kernels behind their
registered checks (pdengine/ops/_checks.py, what the CUDA registration runs): each call must
raise a ValueError naming the same argument on both.
"""
import pytest
import torch

from conftest import backend_op


def _loss_args():
    g = torch.Generator().manual_seed(0)
    n, d, v, k, r = 5, 8, 40, 3, 2
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.2
    labels = torch.randint(0, v, (n,), generator=g)
    return [torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.randn(r, d, generator=g),
            torch.randn(v, r, generator=g), ids, lp, labels, 0.5, 2.0, 0.0, True, 0.3, -100]


def _refuses(backend, op, name, *args):
    """The raw op `op` of `backend` raises a ValueError naming `name`."""
    with pytest.raises(ValueError, match=name):
        backend_op(backend, op)(*args)


def _with(args, **changes):
    names = ["hidden", "weight", "lora_a", "lora_b", "ids", "lp", "labels", "lora_scale",
             "temperature", "softcap", "tail", "ce_weight", "ignore_index"]
    out = list(args)
    for name, value in changes.items():
        out[names.index(name)] = value
    return out


def _loss_cases():
    a = _loss_args()
    bad_ids = a[4].clone()
    bad_ids[0, 0] = 40
    bad_labels = a[6].clone()
    bad_labels[1] = 41
    return {
        "hidden_1d": (_with(a, hidden=a[0][0]), "hidden"),
        "hidden_int": (_with(a, hidden=a[0].long()), "hidden"),
        "weight_width": (_with(a, weight=a[1][:, :-1]), "weight"),
        "lora_alone": (_with(a, lora_b=None), "lora_a and lora_b"),
        "lora_b_shape": (_with(a, lora_b=a[3][:, :1]), "lora_b"),
        "ids_float": (_with(a, ids=a[4].float()), "teacher_ids"),
        "ids_rows": (_with(a, ids=a[4][:-1], lp=a[5][:-1]), "teacher_ids"),
        "ids_range": (_with(a, ids=bad_ids), "teacher_ids"),
        "lp_shape": (_with(a, lp=a[5][:, :-1]), "teacher_logprobs"),
        "labels_shape": (_with(a, labels=a[6][:-1]), "labels"),
        "labels_range": (_with(a, labels=bad_labels), "labels"),
        "temperature": (_with(a, temperature=0.0), "temperature"),
        "softcap": (_with(a, softcap=-1.0), "softcap"),
    }


LOSS_CASES = _loss_cases()


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_ops_refuse_alike(backend, case):
    args, name = LOSS_CASES[case]
    _refuses(backend, "linear_topk_kl", name, *args)
    _refuses(backend, "linear_topk_kl_forward_backward", name, torch.ones(5), *args, True)


def test_loss_backward_checks_its_own_tensors(backend):
    args, bwd = _loss_args(), "linear_topk_kl_backward"
    _refuses(backend, bwd, "grad_loss", torch.ones(4), *args[:7], torch.zeros(5), *args[7:], True)
    _refuses(backend, bwd, "lse", torch.ones(5), *args[:7], torch.zeros(4), *args[7:], True)


def _lora_cases():
    x, w, a, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    bias = torch.randn(5)
    ok = [x, w, a, b, 1.0, bias, 0.0, 0]
    return {
        "x_1d": ([x[0], *ok[1:]], "x"),
        "weight_width": ([x, w[:, :-1], *ok[2:]], "weight"),
        "lora_a_width": ([x, w, a[:, :-1], *ok[3:]], "lora_a"),
        "lora_b_shape": ([x, w, a, b[:-1], *ok[4:]], "lora_b"),
        "bias_shape": ([*ok[:5], bias[:-1], 0.0, 0], "bias"),
        "dropout": ([*ok[:6], 1.0, 0], "dropout"),
    }


LORA_CASES = _lora_cases()


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_ops_refuse_alike(backend, case):
    args, name = LORA_CASES[case]
    _refuses(backend, "lora_linear", name, *args)
    if name != "bias":  # the backward has no bias argument
        x, w, a, b, scale, _bias, p, seed = args
        _refuses(backend, "lora_linear_backward", name, torch.ones(4, 5), x, w, a, b, scale, p, seed)


@pytest.mark.parametrize("change,name", [
    (lambda h, w, k, t, c: (h, w[:, :-1], k, t, c), "weight"),
    (lambda h, w, k, t, c: (h, w, 0, t, c), "k must be"),
    (lambda h, w, k, t, c: (h, w, 21, t, c), "k must be"),
    (lambda h, w, k, t, c: (h, w, k, -1.0, c), "temperature"),
    (lambda h, w, k, t, c: (h, w, k, t, -2.0), "softcap"),
])
def test_teacher_topk_refuses_alike(backend, change, name):
    _refuses(backend, "teacher_topk", name, *change(torch.randn(3, 4), torch.randn(20, 4), 2, 1.0, 0.0))
