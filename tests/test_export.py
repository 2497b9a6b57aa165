"""pdengine.export: a merged model loads with plain transformers and gives the adapter's outputs."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import QA_WORDS, WORD_CHAT, qa_tokenizer, tiny_model
from pdengine import export as X
from pdengine.errors import InputError
from pdengine.lora import add_lora, save_adapter

PROBE = torch.tensor([[3, 9, 12, 5, 20, 7, 14, 2]])


def _base(path, tied: bool):
    model = tiny_model("llama", vocab_size=len(QA_WORDS), seed=0, tie_word_embeddings=tied,
                       pad_token_id=0, eos_token_id=1, bos_token_id=None)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    model.save_pretrained(path)
    qa_tokenizer().save_pretrained(path)
    return path


def _adapter(base_dir, path, targets, lm_head=False, seed=1):
    """A LoRA with non-zero B (a fresh one is the identity) saved in PEFT format; its logits on PROBE."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    add_lora(model, r=4, alpha=8, target_modules=targets, lm_head=lm_head)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.3)
    save_adapter(model, path)
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def _reloaded_logits(out_dir):
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits, model


CASES = {  # name: (tied base, targets, lm_head LoRA)
    "untied_attention_mlp": (False, ["q_proj", "v_proj", "down_proj"], False),
    "tied_embedding_lora": (True, ["q_proj", "embed_tokens"], False),
    "tied_lm_head_lora": (True, ["o_proj"], True),
    "tied_embedding_and_lm_head": (True, ["embed_tokens"], True),
    "untied_embedding_and_lm_head": (False, ["embed_tokens", "up_proj"], True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_export_reloads_with_the_adapters_outputs(tmp_path, case):
    tied, targets, lm_head = CASES[case]
    base = _base(tmp_path / "base", tied)
    expected = _adapter(base, tmp_path / "adapter", targets, lm_head)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=PROBE).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the outputs
    summary = X.export_merged(base, tmp_path / "adapter", tmp_path / "merged", log=lambda m: None)
    got, merged = _reloaded_logits(tmp_path / "merged")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert summary["untied_embeddings"] == tied
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    if tied:
        assert config["tie_word_embeddings"] is False
        assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == WORD_CHAT
    assert not (tmp_path / ".merged.partial").exists()


def test_tied_base_with_attention_lora_stays_tied(tmp_path):
    base = _base(tmp_path / "base", tied=True)
    expected = _adapter(base, tmp_path / "adapter", ["k_proj", "gate_proj"])
    summary = X.export_merged(base, tmp_path / "adapter", tmp_path / "merged", log=lambda m: None)
    got, merged = _reloaded_logits(tmp_path / "merged")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert summary["untied_embeddings"] is False
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_bfloat16_export_saves_bfloat16_close_to_the_adapter(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    expected = _adapter(base, tmp_path / "adapter", ["q_proj", "up_proj"])
    summary = X.export_merged(base, tmp_path / "adapter", tmp_path / "merged", dtype="bfloat16", log=lambda m: None)
    assert summary["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = merged.float()(input_ids=PROBE).logits
    assert (got - expected).abs().max() / expected.abs().max() < 5e-2


def test_prequantized_base_is_refused(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    _adapter(base, tmp_path / "adapter", ["q_proj"])
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="is a gptq checkpoint"):
        X.export_merged(base, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapter_trained_on_a_quantized_base_is_refused(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    _adapter(base, tmp_path / "train" / "adapter", ["q_proj"])
    (tmp_path / "train" / "run.json").write_text(json.dumps({"config": {"quantize": "nf4", "lr": 1e-4}}))
    with pytest.raises(InputError, match="trained on a nf4-quantized base"):
        X.export_merged(base, tmp_path / "train" / "adapter", tmp_path / "merged")
    (tmp_path / "train" / "run.json").write_text(json.dumps({"config": {"quantize": "none"}}))
    X.export_merged(base, tmp_path / "train" / "adapter", tmp_path / "merged", log=lambda m: None)


def test_adapter_whose_teacher_cache_was_quantized_is_refused(tmp_path):
    """run.json without a quantize setting: the cache manifest's model config tells."""
    base = _base(tmp_path / "base", tied=False)
    _adapter(base, tmp_path / "train" / "adapter", ["q_proj"])
    cache = tmp_path / "cache"
    cache.mkdir()
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    manifest = {"model": {"config": {"model_type": "llama", "quantization_config": bnb}}}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    run = {"config": {"lr": 1e-4}, "cache": {"path": str(cache)}}
    (tmp_path / "train" / "run.json").write_text(json.dumps(run))
    with pytest.raises(InputError, match="trained on a nf4-quantized base .*manifest.json"):
        X.export_merged(base, tmp_path / "train" / "adapter", tmp_path / "merged")
    manifest["model"]["config"].pop("quantization_config")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    X.export_merged(base, tmp_path / "train" / "adapter", tmp_path / "merged", log=lambda m: None)


def test_existing_output_needs_force_and_other_files_are_never_replaced(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    _adapter(base, tmp_path / "adapter", ["q_proj"])
    X.export_merged(base, tmp_path / "adapter", tmp_path / "merged", log=lambda m: None)
    with pytest.raises(InputError, match="pass --force"):
        X.export_merged(base, tmp_path / "adapter", tmp_path / "merged")
    X.export_merged(base, tmp_path / "adapter", tmp_path / "merged", force=True, log=lambda m: None)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(InputError, match="not a pdengine export"):
        X.export_merged(base, tmp_path / "adapter", tmp_path / "notes", force=True)
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_adapter_that_does_not_fit_the_base_is_an_input_error(tmp_path):
    base = _base(tmp_path / "base", tied=False)
    other = tmp_path / "other"
    tiny_model("llama", vocab_size=len(QA_WORDS), seed=0, hidden_size=16, intermediate_size=32,
               num_attention_heads=2, num_key_value_heads=1).save_pretrained(other)
    qa_tokenizer().save_pretrained(other)
    _adapter(other, tmp_path / "adapter", ["q_proj"])
    with pytest.raises(InputError):
        X.export_merged(base, tmp_path / "adapter", tmp_path / "merged")


def test_cli_arguments_parse_and_run(tmp_path):
    import argparse

    base = _base(tmp_path / "base", tied=True)
    expected = _adapter(base, tmp_path / "adapter", ["embed_tokens"])
    parser = argparse.ArgumentParser()
    X.add_arguments(parser)
    args = parser.parse_args(["--merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                              "--out", str(tmp_path / "merged")])
    assert X.run(args) == 0
    torch.testing.assert_close(_reloaded_logits(tmp_path / "merged")[0], expected, rtol=1e-4, atol=1e-4)
