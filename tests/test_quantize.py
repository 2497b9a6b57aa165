"""A quantized frozen base (pdengine/quantize.py, pdengine/qlora.py): configs, loading
checks, the AVX512-BF16 guard, NF4 decoding bit-exact with bitsandbytes, LoRA gradients on
NF4 / int8 bases, quantizing in memory."""
import sys

import pytest
import torch

from pdengine import qlora
from pdengine import quantize as Q
from pdengine.errors import InputError
from pdengine.lora import LoRALinear, add_lora
from tests.helpers import qa_tokenizer, tiny_model

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes import functional as bnbF  # noqa: E402
from bitsandbytes.functional import has_avx512bf16  # noqa: E402

# two layers so gradients cross a quantized base; rows a whole number of 64-value blocks
# (what bitsandbytes' CPU kernels need, see test_cpu_kernel_misdecodes_partial_row_blocks)
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=len(qa_tokenizer()))


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model("llama", seed=3, **MODEL).save_pretrained(path)
    qa_tokenizer().save_pretrained(path)
    return path


def _load(path, quantize, device="cpu"):
    from transformers import AutoModelForCausalLM

    kwargs = Q.from_pretrained_kwargs(path, quantize, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True, **kwargs)
    return Q.prepare_loaded_model(model, device).eval()


def _batch(seed=0, n=2, t=9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MODEL["vocab_size"], (n, t), generator=gen)
    return ids


def _wrap_quantized(model, r=4, alpha=8.0, dropout=0.0):
    """Every bitsandbytes linear of `model` under a QuantizedLoRALinear (lora_B random,
    so gradients reach lora_A), the rest frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(11)
    for name, module in list(model.named_modules()):
        if Q.is_quantized_linear(module):
            parent, _, child = name.rpartition(".")
            layer = qlora.QuantizedLoRALinear(module, r, alpha, dropout)
            torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
            setattr(model.get_submodule(parent), child, layer)
    return model


def _dense_twin(path, quantized):
    """The float32 model holding the dequantized weights of `quantized`, with the same
    LoRA factors on the same modules (pdengine.lora.LoRALinear)."""
    model = _load(path, None)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, qlora.QuantizedLoRALinear)}
    add_lora(model, 4, 8.0, 0.0, target_modules=[n.rpartition(".")[2] for n in layers])
    with torch.no_grad():
        for name, layer in layers.items():
            twin = model.get_submodule(name)
            twin.base_layer.weight.copy_(Q.dequantize_weight(layer.base_layer, torch.float32))
            twin.lora_A.weight.copy_(layer.lora_A.weight)
            twin.lora_B.weight.copy_(layer.lora_B.weight)
    return model


def _lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


# ----------------------------------------------------------------- settings and errors


def test_parse_quantize():
    assert Q.parse_quantize(None) is None and Q.parse_quantize("none") is None
    assert Q.parse_quantize("nf4") == "nf4" and Q.parse_quantize("int8") == "int8"
    with pytest.raises(InputError, match="'fp8' is not one of none, nf4, int8"):
        Q.parse_quantize("fp8")


def test_bnb_config_nf4_and_int8():
    cpu = Q.bnb_config("nf4", "cpu")
    assert cpu.load_in_4bit and cpu.bnb_4bit_quant_type == "nf4" and cpu.bnb_4bit_use_double_quant
    assert cpu.bnb_4bit_compute_dtype == torch.float32
    assert Q.bnb_config("nf4", "cuda").bnb_4bit_compute_dtype == torch.bfloat16
    assert Q.bnb_config("int8", "cpu").load_in_8bit
    assert Q.bnb_config("none", "cpu") is None


def test_missing_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(InputError) as e:
        Q.bnb_config("nf4", "cpu")
    assert "needs bitsandbytes" in str(e.value) and "\n" not in str(e.value)


def test_loaded_nf4_model_keeps_embeddings_and_head(checkpoint):
    model = _load(checkpoint, "nf4")
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14  # 7 projections x 2 layers
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert Q.quantization_identity(model) == {"method": "bitsandbytes-nf4", "blocksize": 64, "double_quant": True}
    assert Q.quantization_identity(_load(checkpoint, None)) is None


def test_load_model_and_tokenizer_quantize(checkpoint, monkeypatch):
    from pdengine.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(checkpoint, device="cpu", quantize="nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers) and not model.training
    with pytest.raises(InputError, match="is not one of none, nf4, int8"):
        load_model_and_tokenizer(checkpoint, device="cpu", quantize="nf8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(InputError, match="needs bitsandbytes"):
        load_model_and_tokenizer(checkpoint, device="cpu", quantize="int8")


def test_int8_identity(checkpoint):
    model = _load(checkpoint, "int8")
    assert Q.quantization_identity(model) == {"method": "bitsandbytes-int8", "threshold": 6.0}
    assert Q.quantization_name(Q.quantization_identity(model)) == "int8"


def test_prequantized_checkpoint(checkpoint, tmp_path):
    _load(checkpoint, "nf4").save_pretrained(tmp_path / "nf4")
    assert Q.checkpoint_quantization(tmp_path / "nf4") == "nf4"
    assert Q.checkpoint_quantization(checkpoint) is None
    with pytest.raises(InputError, match="already quantized as nf4; it cannot be loaded with --quantize int8"):
        Q.from_pretrained_kwargs(tmp_path / "nf4", "int8", "cpu")
    reloaded = _load(tmp_path / "nf4", None)  # as stored
    assert Q.quantization_identity(reloaded)["method"] == "bitsandbytes-nf4"
    assert _load(tmp_path / "nf4", "nf4") is not None


def test_merge_into_quantized_base_is_refused(checkpoint):
    model = _wrap_quantized(_load(checkpoint, "nf4"))
    with pytest.raises(InputError, match="cannot merge a LoRA adapter into a quantized base"):
        qlora.refuse_quantized_merge(model)
    qlora.refuse_quantized_merge(add_lora(_load(checkpoint, None), 2, 4.0))  # a plain base is fine


# ---------------------------------------------------------------- NF4 decoding


@pytest.mark.parametrize("shape", [(37, 45), (64, 128), (33, 7), (3, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_nf4_bit_exact(shape, dtype, nested, blocksize):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(packed, quant_state=state, bnb_quantized=True, module=layer)
    got = Q.dequantize_nf4(Q.nf4_weight(layer))
    want = bnbF.dequantize_4bit(packed, state)
    assert got.dtype == want.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)


# ------------------------------------------------------ the AVX512-BF16 repacking trap


def _eval_pass(model):
    with torch.no_grad():
        model(input_ids=_batch(seed=9))


def test_nf4_lora_gradients_match_dequantized_fp32_model(checkpoint):
    """LoRA gradients on the NF4 base against a float32 model holding the dequantized
    weights (the issue's bound: relative error <= 1e-5), after an eval pass on the base."""
    quantized = _load(checkpoint, "nf4")
    _eval_pass(quantized)  # would repack every Linear4bit without the guard
    quantized = _wrap_quantized(quantized)
    twin = _dense_twin(checkpoint, quantized)
    ids = _batch()
    loss, grads = _lora_grads(quantized.train(), ids)
    twin_loss, twin_grads = _lora_grads(twin.train(), ids)
    assert len(grads) == 28 and set(grads) == set(twin_grads)
    assert _rel(loss, twin_loss) <= 1e-5
    for name, grad in grads.items():
        assert grad is not None, name
        assert _rel(grad, twin_grads[name]) <= 1e-5, name


def _peft_grads(model, ids, eval_first=True):
    """LoRA gradients of PEFT on `model` (bitsandbytes' own layers), after an eval pass."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(len(name)))
    if eval_first:
        _eval_pass(peft_model)
    return _lora_grads(peft_model.train(), ids)


def test_guarded_base_keeps_peft_gradients_after_eval_pass(checkpoint):
    """bitsandbytes' own path (PEFT on our loaded model): an eval pass before training must
    not cost a single LoRA gradient, and the gradients equal those of a model that never
    ran in eval mode."""
    ids = _batch()
    _, want = _peft_grads(_load(checkpoint, "nf4"), ids, eval_first=False)  # never repacked
    _, got = _peft_grads(_load(checkpoint, "nf4"), ids)
    assert len(got) == 28
    for name, grad in got.items():
        assert grad is not None, name
        assert _rel(grad, want[name]) <= 1e-6, name


@pytest.mark.skipif(not has_avx512bf16(), reason="the repacking trap exists only on CPUs with AVX512-BF16")
def test_trap_still_exists_without_the_guard(checkpoint):
    """Why the guard exists: unguarded, the eval pass repacks the weights and gradients
    through the base are dropped. If bitsandbytes fixes this, the guard can go."""
    _, want = _peft_grads(_load(checkpoint, "nf4"), _batch(), eval_first=False)
    model = _load(checkpoint, "nf4")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    _, grads = _peft_grads(model, _batch())
    errors = [1.0 if g is None else _rel(g, want[name]) for name, g in grads.items()]
    assert max(errors) > 0.1, "gradients survived the repacking: has bitsandbytes fixed the trap?"


# -------------------------------------------------------------------------- int8


def test_int8_forward_is_one_function_in_train_and_eval(checkpoint):
    """bitsandbytes' CPU int8 forward is LLM.int8 in eval and dequantize-then-matmul in
    training; the pinned layers compute the latter in both modes (teacher = student base)."""
    model = _load(checkpoint, "int8")
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(6, 64) * 3
    with torch.no_grad():
        eval_out = layer.eval()(x)
        train_out = layer.train()(x)
    assert torch.equal(eval_out, train_out)
    assert _rel(eval_out, x @ Q.dequantize_weight(layer, torch.float32).T) < 1e-6
    unpinned = bnb.nn.Linear8bitLt.forward
    with torch.no_grad():
        assert _rel(unpinned(layer.eval(), x), unpinned(layer.train(), x)) > 1e-4  # why it is pinned


def test_int8_lora_layer(checkpoint):
    """int8: the base term is the pinned layer's own (the teacher's), dx flows through it,
    and the low-rank term is s B A x."""
    model = _load(checkpoint, "int8")
    base = model.model.layers[0].self_attn.q_proj
    layer = qlora.QuantizedLoRALinear(base, 4, 8.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        want = base(x) + layer.scale * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert _rel(y.detach(), want) <= 1e-6
    y.square().sum().backward()
    assert x.grad is not None and layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    original = _load(checkpoint, None).model.layers[0].self_attn.q_proj.weight
    assert 0 < _rel(Q.dequantize_weight(base, torch.float32), original) < 1e-2  # int8 rounding only


# ------------------------------------------------ bitsandbytes' CPU decoding quirk


def test_cpu_kernel_misdecodes_partial_row_blocks(tmp_path):
    """bitsandbytes' AVX512 CPU dequantize picks the absmax per row, not per flat block:
    for rows of 48 values it disagrees with its own reference decode (and with the
    weights), so such a model is refused on the CPU. If this starts passing equal, the
    refusal (quantize.refuse_misdecoded_cpu_shapes) can go."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    weight = torch.randn(48, 48, generator=torch.Generator().manual_seed(1))
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    reference = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, state.code, 64, [48, 48], torch.float32)
    layer = bnb.nn.Linear4bit(48, 48, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(packed, quant_state=state, bnb_quantized=True, module=layer)
    assert torch.equal(Q.dequantize_nf4(Q.nf4_weight(layer)), reference)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not torch.equal(bnbF.dequantize_4bit(packed, state), reference)
    tiny_model("llama", seed=3, **dict(MODEL, hidden_size=48)).save_pretrained(tmp_path / "m48")
    with pytest.raises(InputError, match="in_features 48 is not a multiple of the NF4 blocksize 64"):
        _load(tmp_path / "m48", "nf4")


# ------------------------------------------------------------- quantizing in memory


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantize_model_in_memory_equals_loading(checkpoint, quantize):
    """quantize_model on the dense model = from_pretrained with bnb_config: the same bytes."""
    loaded = _load(checkpoint, quantize)
    converted = qlora.quantize_model(_load(checkpoint, None), quantize)
    want = {n: m for n, m in loaded.named_modules() if Q.is_quantized_linear(m)}
    got = {n: m for n, m in converted.named_modules() if Q.is_quantized_linear(m)}
    assert set(got) == set(want) and len(got) == 14
    assert type(converted.lm_head) is torch.nn.Linear
    for name, layer in got.items():
        assert type(layer) is type(want[name])
        assert torch.equal(Q.dequantize_weight(layer, torch.float32), Q.dequantize_weight(want[name], torch.float32))
    ids = _batch()
    with torch.no_grad():
        assert _rel(converted(input_ids=ids).logits, loaded(input_ids=ids).logits) < 1e-6
    assert Q.quantization_identity(converted) == Q.quantization_identity(loaded)


def test_quantize_model_keeps_lora_adapters(checkpoint):
    model = add_lora(_load(checkpoint, None), 4, 8.0, lm_head=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    qlora.quantize_model(model, "nf4")
    after = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    layers = [m for m in model.modules() if isinstance(m, qlora.QuantizedLoRALinear)]
    assert len(layers) == 14 and type(model.lm_head) is LoRALinear  # the output layer stays dense
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


# ------------------------------------------------------------- adapters, PEFT format


def _trained_nf4_adapter(checkpoint, path):
    """A LoRA trained-looking (random B) on the NF4 base, saved in PEFT's format."""
    from pdengine.lora import save_adapter

    model = add_lora(_load(checkpoint, None), 4, 8.0)
    qlora.quantize_model(model, "nf4")
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    save_adapter(model, path)
    return model


def test_nf4_adapter_loads_on_a_full_precision_base(checkpoint, tmp_path):
    from pdengine.lora import load_adapter

    model = _trained_nf4_adapter(checkpoint, tmp_path / "adapter")
    dense = load_adapter(_load(checkpoint, None), tmp_path / "adapter")
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in dense.named_parameters() if "lora_" in n}
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_nf4_adapter_in_peft_on_a_bitsandbytes_model(checkpoint, tmp_path):
    """PEFT's own LoRA on bitsandbytes' own NF4 layers computes what our layers do."""
    from peft import PeftModel

    model = _trained_nf4_adapter(checkpoint, tmp_path / "adapter").eval()
    peft_model = PeftModel.from_pretrained(_load(checkpoint, "nf4"), tmp_path / "adapter").eval()
    ids = _batch()
    with torch.no_grad():
        assert _rel(model(input_ids=ids).logits, peft_model(input_ids=ids).logits) < 1e-5


# --------------------------------------------------------------- bench/qlora.py smoke


def test_bench_qlora_runs_and_its_formula_counts_the_base(monkeypatch):
    """bench/qlora.py at a tiny shape: every base runs, NF4 gradients equal the dequantized
    twin's, and the formula's base bytes are the measured ones."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "bench"))
    import qlora as bench

    tiny = (dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2), torch.float32, 32, 1, 4)
    monkeypatch.setitem(bench.PRESETS, "tiny", tiny)
    rows = bench.measure("tiny", ["dense", "nf4", "int8"], torch.device("cpu"), reps=1)
    assert [r["base"] for r in rows] == ["float32", "nf4", "int8"]
    for row in rows:
        assert abs(row["base_linears_MB"] / row["predicted_base_linears_MB"] - 1) < 0.02, row
        assert row["step_ms"] > 0
    assert rows[0]["base_linears_MB"] / rows[1]["base_linears_MB"] > 3.5
    assert rows[1]["nf4_grad_rel_err"] <= 1e-5
    estimate = bench.eight_b_estimate()
    assert estimate[0]["resident_GB"] > 16 > estimate[1]["resident_GB"] > 5


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_teacher_is_the_students_quantized_base(checkpoint, quantize):
    """Adapters disabled, the student is exactly the quantized model the teacher ran; with
    fresh adapters (B = 0) it computes the same function up to summation order."""
    from pdengine.lora import disable_adapters

    teacher = _load(checkpoint, quantize)
    student = _load(checkpoint, quantize)
    for p in student.parameters():
        p.requires_grad_(False)
    for name, module in list(student.named_modules()):
        if Q.is_quantized_linear(module):
            parent, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent), child, qlora.QuantizedLoRALinear(module, 4, 8.0))
    ids = _batch()
    with torch.no_grad():
        want = teacher(input_ids=ids).logits
        with disable_adapters(student):
            assert torch.equal(student(input_ids=ids).logits, want)
        assert _rel(student.train()(input_ids=ids).logits, want) < 1e-5


# ------------------------------------------------ wired through pdengine.lora / loading


def test_add_lora_wraps_quantized_layers_and_adapters_round_trip(checkpoint, tmp_path):
    """add_lora on a loaded NF4 model wraps every Linear4bit; load_adapter puts a saved
    adapter back on a quantized base; merging into it is refused."""
    from pdengine.lora import load_adapter, merge_adapter, save_adapter

    model = add_lora(_load(checkpoint, "nf4"), 4, 8.0)
    layers = [m for m in model.modules() if isinstance(m, qlora.QuantizedLoRALinear)]
    assert len(layers) == 14
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(_load(checkpoint, "nf4"), tmp_path / "adapter").eval()
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    with pytest.raises(InputError, match="cannot merge a LoRA adapter into a quantized base"):
        merge_adapter(model)


def test_fingerprint_records_the_quantization(checkpoint):
    """A cache made with an NF4 teacher refuses a bf16/fp32 student (and the reverse),
    naming the quantization; loading and in-memory quantization share one fingerprint."""
    from pdengine.fingerprints import model_differences, model_fingerprint

    nf4 = model_fingerprint(_load(checkpoint, "nf4"))
    dense = model_fingerprint(_load(checkpoint, None))
    assert nf4["quantization"] == {"method": "bitsandbytes-nf4", "blocksize": 64, "double_quant": True}
    assert dense["quantization"] is None and nf4["fingerprint"] != dense["fingerprint"]
    problems = model_differences(nf4, dense)
    assert problems[0].startswith("quantization: cache nf4, given none") and len(problems) == 1
    assert model_differences(dense, nf4)[0].startswith("quantization: cache none, given nf4")
    assert model_fingerprint(qlora.quantize_model(_load(checkpoint, None), "nf4")) == nf4
    assert model_differences(nf4, model_fingerprint(_load(checkpoint, "int8")))[0].startswith(
        "quantization: cache nf4, given int8")
