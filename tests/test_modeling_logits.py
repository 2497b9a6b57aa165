"""pdengine.modeling.full_logits: the production logits helper equals the reference's specification."""
import pytest
import torch

from pdengine import modeling, reference


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_lora", [False, True])
def test_full_logits_equal_the_reference(softcap, with_lora):
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    a, b = torch.randn(2, 8), torch.randn(11, 2)
    lora = (a, b, 0.5) if with_lora else None
    want = reference.student_logits(hidden, weight, *(lora or ()), softcap=softcap)
    got = modeling.full_logits(hidden, weight, lora, softcap=softcap)
    assert got.shape == (10, 11) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_full_logits_of_bf16_inputs_are_float32():
    hidden, weight = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    assert modeling.full_logits(hidden, weight).dtype == torch.float32


def test_the_trainer_does_not_import_the_reference():
    """The reference is the specification for tests; production code uses modeling.full_logits."""
    import pathlib

    root = pathlib.Path(modeling.__file__).parent
    files = [root / "train.py", root / "cache.py", root / "integrations.py", *(root / "training").glob("*.py")]
    for path in files:
        text = path.read_text()
        assert "pdengine.reference" not in text and "import reference" not in text, path
