"""Shared test set-up.

On a machine without a GPU, Triton kernels run in the interpreter; TRITON_INTERPRET
must be set before triton is first imported, hence here at the very top.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pdengine  # noqa: E402  (registers torch.ops.pdengine)
from pdengine.ops import _library  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "cpp"]


def backend_op(backend: str, name: str):
    """The raw forward/backward function of op `name` for `backend`, with the schema's
    positional signature (see pdengine/ops/_library.py SCHEMAS). Test files parametrize
    over BACKENDS so the Triton and C++ versions share every case.
    """
    if backend == "triton":
        from importlib import import_module

        module = next(op for op in ("linear_topk_kl", "lora_linear", "teacher_topk") if name.startswith(op))
        # behind the raw op's argument checks, as the CUDA registration runs it
        return _library.checked(name, getattr(import_module(f"pdengine.kernels.{module}"), name))
    if backend == "cpp":
        if not _library.HAS_CPP:
            pytest.fail("the C++ extension pdengine._C is not built (run ./run.sh test)")
        return getattr(torch.ops.pdengine, name)
    raise ValueError(backend)


def backend_device(backend: str) -> str:
    """Triton runs on the GPU when there is one; C++ always on the CPU."""
    return "cpu" if backend == "cpp" else DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """helpers.save_tiny's model + tokenizer directory, saved once per test module (the
    CLI tests read it, none writes into it)."""
    from helpers import save_tiny  # transformers: imported only by the modules that use it

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a GPU test (tests/test_cuda_ops.py; skipped without CUDA)")
