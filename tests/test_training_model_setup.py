"""pdengine.training.model_setup: adapters added from the config (or kept), the rest frozen."""
import json

import pytest
import torch
from train_helpers import adapter_tensors, config, teacher_items, tiny_model

from pdengine.errors import InputError
from pdengine.lora import add_lora, lm_head_lora
from pdengine.train import prepare_model, train


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model())


def test_lm_head_lora_and_gradient_checkpointing_train_the_head(tmp_path, items):
    model = tiny_model()
    train(model, None, items, tmp_path, config(max_steps=2, lora_lm_head=True, grad_checkpointing=True))
    _, _, lora_b, _ = lm_head_lora(model)
    assert lora_b is not None and lora_b.abs().sum() > 0  # B starts at zero: it was trained
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" in saved["target_modules"]


def test_adapters_come_from_the_config_and_the_seed_only():
    first, second = tiny_model(), tiny_model()
    torch.manual_seed(123)  # the global generator's state must not matter
    params = prepare_model(first, config(seed=3))
    prepare_model(second, config(seed=3))
    a, b = adapter_tensors(first), adapter_tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert set(params) == set(a) and all(p.requires_grad for p in params.values())
    assert not any(p.requires_grad for n, p in first.named_parameters() if "lora_" not in n)
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in params.values())  # lora_r=4


def test_existing_adapters_are_kept():
    model = add_lora(tiny_model(), 2, 4, target_modules=["q_proj"])
    params = prepare_model(model, config())
    assert params and all(".q_proj." in n for n in params)


def test_lora_targets_that_match_nothing_are_an_input_error():
    with pytest.raises(InputError, match="lora settings: target_modules=\\['no_such_module'\\] matches no module"):
        prepare_model(tiny_model(), config(lora_targets=("no_such_module",)))
