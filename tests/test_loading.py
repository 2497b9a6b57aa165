"""pdengine.loading: local Hugging Face directories only, with errors that say what is wrong."""
import argparse
import json

import pytest
import torch
from helpers import WORD_CHAT, qa_model, save_tiny

from pdengine import loading
from pdengine.errors import InputError


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


# ---------------------------------------------------------------- attention and quantization flags


def test_the_attention_implementation_is_the_one_asked_for_and_printed_once(tmp_path, capsys, monkeypatch):
    save_tiny(tmp_path)
    monkeypatch.setattr(loading, "_ANNOUNCED", set())
    model, _ = loading.load_model_and_tokenizer(tmp_path, device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager" == loading.attention_implementation_of(model)
    loading.load_model_and_tokenizer(tmp_path, device="cpu", attn_implementation="eager")
    assert capsys.readouterr().err.count("attention implementation eager") == 1
    auto, _ = loading.load_model_and_tokenizer(tmp_path, device="cpu")
    assert auto.config._attn_implementation == "sdpa"  # auto on CPU


def test_an_unavailable_attention_implementation_is_an_input_error(tmp_path):
    save_tiny(tmp_path)
    with pytest.raises(InputError, match="'flash_attention_2' cannot be used"):
        loading.load_model_and_tokenizer(tmp_path, device="cpu", attn_implementation="flash_attention_2")
    with pytest.raises(InputError, match="not available on cpu"):  # no CPU backward
        loading.load_model_and_tokenizer(tmp_path, device="cpu", attn_implementation="flex_attention", training=True)
    with pytest.raises(InputError, match="'flex_attention' cannot be used: it is not available on cpu"):  # its kernels crash there
        loading.load_model_and_tokenizer(tmp_path, device="cpu", attn_implementation="flex_attention")


def test_add_model_arguments_and_load_from_args(tmp_path):
    save_tiny(tmp_path)
    parser = argparse.ArgumentParser()
    loading.add_model_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path), "--device", "cpu", "--attn-implementation", "eager"])
    assert args.quantize == "none"
    model, tok = loading.load_from_args(args)
    assert model.config._attn_implementation == "eager" and tok is not None
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--attn-implementation", "fast"])
    optional = argparse.ArgumentParser()
    loading.add_model_arguments(optional, model_required=False)
    assert optional.parse_args([]).model is None


def test_quantize_goes_through_bitsandbytes(tmp_path, monkeypatch):
    from pdengine import quantize

    save_tiny(tmp_path)
    with pytest.raises(InputError, match="--quantize 'fp8' is not one of"):
        loading.load_model_and_tokenizer(tmp_path, device="cpu", quantize="fp8")

    def no_bitsandbytes():
        raise InputError("--quantize needs bitsandbytes, which cannot load here (ImportError: gone)")

    monkeypatch.setattr(quantize, "import_bitsandbytes", no_bitsandbytes)
    with pytest.raises(InputError, match="--quantize needs bitsandbytes"):
        loading.load_model_and_tokenizer(tmp_path, device="cpu", quantize="int8")
    plain, _ = loading.load_model_and_tokenizer(tmp_path, device="cpu", quantize="none")
    assert not quantize.is_quantized_model(plain)


def test_int8_base_loads_quantized(tmp_path):
    pytest.importorskip("bitsandbytes")
    from pdengine import quantize

    save_tiny(tmp_path)
    model, _ = loading.load_model_and_tokenizer(tmp_path, device="cpu", quantize="int8")
    assert quantize.quantization_name(quantize.quantization_identity(model)) == "int8"


def test_keep_on_cpu_loads_in_the_devices_dtype_and_leaves_the_weights_on_the_cpu(model_dir, monkeypatch):
    """`pdengine train --fsdp`: dtype and attention for the GPU, weights on the CPU (FSDP
    moves each layer as it shards it). Here the "GPU" is only what pick_device answers."""
    monkeypatch.setattr(loading, "pick_device", lambda device=None: torch.device("cuda", 0))
    model, _ = loading.load_model_and_tokenizer(model_dir, keep_on_cpu=True, attn_implementation="sdpa")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the CUDA default
    with pytest.raises(InputError, match="quantized base .* cannot stay on the CPU"):
        loading.load_model_and_tokenizer(model_dir, keep_on_cpu=True, quantize="nf4")
