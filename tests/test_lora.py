"""pdengine.lora: LoRA layers on tiny random HF models, PEFT-format interchange both ways."""
import copy
import json
import re
import warnings

import helpers
import pytest
import torch
from safetensors.torch import load_file, save_file

import pdengine
from pdengine import lora as L
from pdengine import modeling
from pdengine.errors import InputError

peft = pytest.importorskip("peft")

VOCAB = 64
# helpers.tiny_model at this file's sizes: intermediate 48, tied embeddings for qwen2 and gemma
# (gemma: a scaled word embedding; phi3: fused qkv_proj / gate_up_proj).
FAMILY_CONFIG = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "gemma": {"tie_word_embeddings": True},
    "phi3": {},
}
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "qwen2": ["q_proj", "k_proj", "o_proj", "up_proj", "embed_tokens"],
    "gemma": ["q_proj", "gate_proj", "embed_tokens"],
    "phi3": ["qkv_proj", "gate_up_proj", "o_proj", "embed_tokens"],
}


def tiny_model(family, seed=0, **overrides):
    return helpers.tiny_model(family, vocab_size=VOCAB, seed=seed, intermediate_size=48,
                              **{**FAMILY_CONFIG[family], **overrides})


def randomize_lora(model, seed=1):
    """Non-zero LoRA weights (B starts at zero, which would hide every mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def input_ids(seed=0):
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- layers


def test_add_lora_defaults_init_and_freezing():
    model = tiny_model("llama")
    ids = input_ids()
    base = logits(model, ids)
    pdengine.add_lora(model, r=4, alpha=8)
    layers = L.lora_modules(model)
    assert {n.rpartition(".")[2] for n in layers} == set(L.DEFAULT_TARGET_MODULES)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layer = layers["model.layers.0.self_attn.q_proj"]
    assert layer.scale == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0  # PEFT init: B = 0, A Kaiming
    bound = 1 / layer.in_features**0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert 0 < layer.lora_A.weight.abs().max() <= bound
    torch.testing.assert_close(logits(model, ids), base)  # B = 0: nothing changes yet


def test_rslora_scale_and_embedding_init():
    model = pdengine.add_lora(tiny_model("llama"), r=16, alpha=8, rslora=True,
                              target_modules=["q_proj", "embed_tokens"])
    emb = model.model.embed_tokens
    assert isinstance(emb, L.LoRAEmbedding)
    assert emb.lora_embedding_A.shape == (16, VOCAB) and emb.lora_embedding_B.shape == (32, 16)
    assert torch.count_nonzero(emb.lora_embedding_A) == 0  # PEFT: A zeros, B normal
    assert 0.5 < emb.lora_embedding_B.std().item() < 1.5
    assert model.model.layers[0].self_attn.q_proj.scale == 2.0  # 8 / sqrt(16)


def test_training_step_reaches_only_lora_params():
    model = randomize_lora(pdengine.add_lora(tiny_model("qwen2"), r=4, alpha=8, dropout=0.1,
                                             target_modules=TARGETS["qwen2"]))
    model.train()
    model(input_ids()).logits.square().mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_half_precision_model_gets_fp32_adapters():
    """Like PEFT (autocast_adapter_dtype): bf16 base, fp32 LoRA factors and gradients."""
    model = pdengine.add_lora(tiny_model("llama").to(torch.bfloat16), r=4, alpha=8,
                              target_modules=["q_proj", "embed_tokens"], lm_head=True)
    randomize_lora(model)
    assert model.lm_head.lora_A.weight.dtype == torch.float32
    assert model.model.embed_tokens.lora_embedding_B.dtype == torch.float32
    out = model(input_ids()).logits
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grad = model.model.layers[0].self_attn.q_proj.lora_B.weight.grad
    assert grad.dtype == torch.float32 and torch.count_nonzero(grad) > 0


def test_dropout_only_in_training():
    model = randomize_lora(pdengine.add_lora(tiny_model("llama"), r=4, alpha=8, dropout=0.5))
    ids = input_ids()
    model.train()
    torch.manual_seed(0)
    a = model(ids).logits
    b = model(ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(logits(model, ids), logits(model, ids))


def test_disable_adapters_is_the_base_model():
    model = tiny_model("gemma")
    ids = input_ids()
    base = logits(model, ids)
    randomize_lora(pdengine.add_lora(model, r=4, alpha=8, target_modules=TARGETS["gemma"], lm_head=True))
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    with pdengine.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), base)
        assert pdengine.lm_head_lora(model)[1] is None
    torch.testing.assert_close(logits(model, ids), adapted)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_lm_head_lora_reproduces_the_logits(family):
    """What the trainer feeds the fused loss: hidden @ (W + s B A)^T == the model's logits."""
    model = randomize_lora(pdengine.add_lora(tiny_model(family), r=4, alpha=8, lm_head=True))
    ids = input_ids()
    weight, lora_a, lora_b, scale = pdengine.lm_head_lora(model)
    assert lora_a.shape == (4, 32) and lora_b.shape == (VOCAB, 4) and scale == 2.0
    with torch.no_grad():
        h = modeling.hidden_states(model, ids)
        u = h @ weight.T + scale * (h @ lora_a.T) @ lora_b.T
    cap = modeling.final_logit_softcap(model)
    if cap:
        u = cap * torch.tanh(u / cap)
    torch.testing.assert_close(u, logits(model, ids), atol=1e-5, rtol=1e-5)


def test_generate_uses_the_adapters():
    """Generation (KV cache, lm_head called as a module) == greedy steps of full forwards."""
    model = randomize_lora(pdengine.add_lora(tiny_model("phi3"), r=4, alpha=8,
                                             target_modules=TARGETS["phi3"], lm_head=True))
    ids = input_ids()[:1, :5]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    steps = ids
    for _ in range(5):
        steps = torch.cat([steps, logits(model, steps)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, steps)
    with pdengine.disable_adapters(model):
        assert not torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), steps)


def test_lm_head_lora_without_head_adapter():
    model = pdengine.add_lora(tiny_model("llama"), r=4, alpha=8)
    weight, lora_a, lora_b, scale = pdengine.lm_head_lora(model)
    assert weight is model.lm_head.weight and lora_a is None and lora_b is None


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_merge_adapter(family):
    """Merged == adapted, plain modules again; tied embeddings (gemma) with LoRA on only
    one side are untied so each side keeps its own function."""
    model = randomize_lora(pdengine.add_lora(tiny_model(family), r=4, alpha=8,
                                             target_modules=TARGETS[family], lm_head=True))
    ids = input_ids()
    adapted = logits(model, ids)
    merged = pdengine.merge_adapter(model)
    assert not L.lora_modules(merged)
    assert type(merged.model.embed_tokens).__name__ != "LoRAEmbedding"
    torch.testing.assert_close(logits(merged, ids), adapted, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- PEFT interchange


@pytest.mark.parametrize("family", list(FAMILY_CONFIG))
def test_pdengine_adapter_loads_in_peft(family, tmp_path):
    base = tiny_model(family)
    ours = randomize_lora(pdengine.add_lora(copy.deepcopy(base), r=4, alpha=8,
                                            target_modules=TARGETS[family], lm_head=True))
    ids = input_ids()
    want = logits(ours, ids)
    pdengine.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert "lm_head" in config["target_modules"] and config["r"] == 4
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys

    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILY_CONFIG))
def test_peft_adapter_loads_in_pdengine(family, tmp_path):
    base = tiny_model(family)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS[family] + ["lm_head"],
                             init_lora_weights=False, use_rslora=family == "qwen2")  # non-zero B
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    ids = input_ids()
    want = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)

    ours = pdengine.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert L.lora_modules(ours)
    torch.testing.assert_close(logits(ours, ids), want, atol=1e-5, rtol=1e-5)
    with pdengine.disable_adapters(ours):
        torch.testing.assert_close(logits(ours, ids), logits(base, ids))


def test_load_adapter_into_model_with_lora_layers(tmp_path):
    trained = randomize_lora(pdengine.add_lora(tiny_model("llama"), r=4, alpha=8))
    pdengine.save_adapter(trained, tmp_path)
    fresh = pdengine.add_lora(tiny_model("llama"), r=4, alpha=8)
    pdengine.load_adapter(fresh, tmp_path)
    ids = input_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(trained, ids))


# --------------------------------------------------------------------------- errors


def _saved_adapter(tmp_path, family="llama", **kw):
    model = randomize_lora(pdengine.add_lora(tiny_model(family), r=4, alpha=8, **kw))
    pdengine.save_adapter(model, tmp_path)
    return tmp_path


def test_adapter_for_another_architecture_fails(tmp_path):
    path = _saved_adapter(tmp_path, "llama", target_modules=["gate_proj", "embed_tokens"])
    phi3 = tiny_model("phi3")  # has gate_up_proj, no gate_proj
    with pytest.raises(ValueError, match="2 unexpected keys.*another architecture"):
        pdengine.load_adapter(phi3, path)
    assert not L.lora_modules(phi3)  # a failed load leaves the model as it was
    assert all(p.requires_grad for p in phi3.parameters())
    path = _saved_adapter(tmp_path, "llama", target_modules=["gate_proj"])
    with pytest.raises(ValueError, match="matches no module"):
        pdengine.load_adapter(phi3, path)
    other = tiny_model("llama", hidden_size=48)
    with pytest.raises(ValueError, match="shape"):
        pdengine.load_adapter(other, path)


def test_missing_and_unexpected_keys_fail(tmp_path):
    path = _saved_adapter(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="1 missing keys"):
        pdengine.load_adapter(tiny_model("llama"), path)
    tensors["base_model.model.model.layers.0.mlp.extra.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="1 unexpected keys"):
        pdengine.load_adapter(tiny_model("llama"), path)


def test_wrong_rank_fails(tmp_path):
    path = _saved_adapter(tmp_path)
    model = pdengine.add_lora(tiny_model("llama"), r=8, alpha=8)
    with pytest.raises(ValueError, match="shape"):
        pdengine.load_adapter(model, path)


@pytest.mark.parametrize("edit,match", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
])
def test_unsupported_config_fails(tmp_path, edit, match):
    path = _saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=match):
        pdengine.load_adapter(tiny_model("llama"), path)


def test_missing_adapter_files_fail(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        pdengine.load_adapter(tiny_model("llama"), tmp_path / "nope")
    with pytest.raises(ValueError, match="adapter_config.json"):
        pdengine.load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0, alpha=8), "r must be"),
    (dict(r=4, alpha=-1), "alpha must be"),
    (dict(r=4, alpha=8, dropout=1.5), "dropout must be"),
    (dict(r=4, alpha=8, target_modules=["nothing_like_this"]), "matches no module"),
    (dict(r=4, alpha=8, target_modules=["norm"]), "only nn.Linear and nn.Embedding"),
])
def test_add_lora_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pdengine.add_lora(tiny_model("llama"), **kwargs)


def test_add_lora_twice_and_save_without_lora_fail(tmp_path):
    model = pdengine.add_lora(tiny_model("llama"), r=4, alpha=8)
    with pytest.raises(ValueError, match="already has a LoRA"):
        pdengine.add_lora(model, r=4, alpha=8)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        pdengine.save_adapter(tiny_model("llama"), tmp_path)


# --------------------------------------------------------------------------- damaged adapter files


def _one_line_input_error(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_truncated_adapter_weights_are_one_line(tmp_path):
    path = _saved_adapter(tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    message = _one_line_input_error(lambda: pdengine.load_adapter(tiny_model("llama"), path))
    assert message.startswith(f"{path / 'adapter_model.safetensors'}: not a readable safetensors file, truncated?")


def test_missing_config_or_weights_name_the_file(tmp_path):
    path = _saved_adapter(tmp_path)
    (path / "adapter_config.json").unlink()
    message = _one_line_input_error(lambda: pdengine.load_adapter(tiny_model("llama"), path))
    assert message == f"adapter path {path} has no adapter_config.json (is it a PEFT LoRA adapter directory?)"
    path = _saved_adapter(tmp_path / "b")
    (path / "adapter_model.safetensors").unlink()
    message = _one_line_input_error(lambda: pdengine.load_adapter(tiny_model("llama"), path))
    assert "has no adapter_model.safetensors (nor PEFT's older adapter_model.bin)" in message


def test_a_pickled_adapter_loads_only_through_weights_only(tmp_path):
    trained = randomize_lora(pdengine.add_lora(tiny_model("llama"), r=4, alpha=8))
    path = pdengine.save_adapter(trained, tmp_path / "plain")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")  # PEFT's older format: a pickle of tensors
    loaded = pdengine.load_adapter(tiny_model("llama"), path)
    ids = input_ids()
    assert torch.allclose(logits(loaded, ids), logits(trained, ids), atol=1e-5)

    class Payload:  # anything but plain tensors: weights_only refuses to build it
        def __reduce__(self):
            return (print, ("a pickle can run code",))

    torch.save({**tensors, "payload": Payload()}, path / "adapter_model.bin")
    message = _one_line_input_error(lambda: pdengine.load_adapter(tiny_model("llama"), path))
    assert message.startswith(f"{path / 'adapter_model.bin'}: refused by torch.load(weights_only=True)")
    (path / "adapter_model.bin").write_bytes((path / "adapter_model.bin").read_bytes()[:100])
    assert "not a readable torch file, truncated?" in _one_line_input_error(
        lambda: pdengine.load_adapter(tiny_model("llama"), path))
    torch.save([1, 2], path / "adapter_model.bin")
    assert "holds a list, not a dict of named tensors" in _one_line_input_error(
        lambda: pdengine.load_adapter(tiny_model("llama"), path))


@pytest.mark.parametrize("edit,match", [
    ({"r": "4"}, "r must be a positive int, got '4'"),
    ({"r": 0}, "r must be a positive int"),
    ({"lora_alpha": None}, "lora_alpha must be a positive number"),
    ({"target_modules": []}, "target_modules must be a module name pattern or a non-empty list"),
    ({"lora_dropout": 2}, "lora_dropout must be a number in \\[0, 1\\)"),
    ({"target_modules": ["nothing_like_this"]}, "adapter_config.json: .*matches no module"),
])
def test_a_bad_adapter_config_is_one_line_naming_the_file(tmp_path, edit, match):
    path = _saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    model = tiny_model("llama")
    message = _one_line_input_error(lambda: pdengine.load_adapter(model, path))
    assert re.search(match, message) and message.startswith(str(path))
    assert not L.lora_modules(model)


def test_a_config_that_is_not_an_object(tmp_path):
    path = _saved_adapter(tmp_path)
    (path / "adapter_config.json").write_text("[1]")
    assert "must hold a JSON object, got list" in _one_line_input_error(
        lambda: pdengine.load_adapter(tiny_model("llama"), path))
