"""pdengine.loading: local Hugging Face directories only, with errors that say what is wrong."""
import json

import pytest
import torch
from helpers import WORD_CHAT, qa_model, save_tiny

from pdengine import loading


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        loading.load_model_and_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        loading.load_model_and_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="not a causal LM"):
        loading.load_model_and_tokenizer(tmp_path)


def test_unloadable_directory_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="cannot load a causal LM from"):
        loading.load_model_and_tokenizer(tmp_path)


def test_load_model_round_trip(tmp_path):
    save_tiny(tmp_path, seed=3)
    model, tok = loading.load_model_and_tokenizer(tmp_path, device="cpu")
    assert not model.training and tok.chat_template == WORD_CHAT
    assert model.dtype == torch.float32  # the CPU default
    expected = qa_model(seed=3).state_dict()
    assert all(torch.equal(p, expected[name]) for name, p in model.state_dict().items())


def test_pick_device():
    assert loading.pick_device("cpu") == torch.device("cpu")
    assert loading.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
