"""The teacher cache: the top-k encoding, compatibility checks, damaged shards, packed batches."""
import json

import pytest
import torch
from helpers import DOCUMENTS, QA, sentence_word_tokenizer, tiny_model, tiny_model_and_tokenizer

from pdengine import cache_format
from pdengine.cache import TeacherCache
from pdengine.errors import InputError
from pdengine.modeling import segment_attention_mask
from pdengine.prefill import prefill
from pdengine.training.sources import DataSource


@pytest.fixture(scope="module")
def llama_cache(tmp_path_factory):
    model, tok = tiny_model_and_tokenizer("llama")
    path = tmp_path_factory.mktemp("cache")
    qa = QA * 3  # 15 items over 4 shards
    return prefill(model, tok, DOCUMENTS, qa, path, k=8, shard_size=4, progress=False), model, tok


def copy_cache(cache, tmp_path):
    for file in cache.path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


# -- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [2, 50, 1000, 32000, 65536, 65537, 128256])
def test_ids_round_trip_exactly(vocab):
    bits = cache_format.id_bits(vocab)
    assert 2 ** bits >= vocab > 2 ** (bits - 1) or vocab == 2
    ids = torch.randint(0, vocab, (37, 64))
    ids[0] = vocab - 1  # the largest id must fit
    packed = cache_format.pack_ids(ids, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (37, (64 * bits + 7) // 8)
    assert torch.equal(cache_format.unpack_ids(packed, 64, bits), ids)


@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_logprob_encoding_error_is_small(scale):
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(64, 4000, dtype=torch.float64) * scale, -1)
    exact = logp.topk(64).values
    decoded = cache_format.decode_logprobs(*cache_format.encode_logprobs(exact)).double()
    span = exact[:, 0] - exact[:, -1]
    assert ((decoded - exact).abs() <= span[:, None] / 255 + 1e-6).all()  # the companding bound
    assert torch.equal(decoded[:, 0].float(), exact[:, 0].float())  # the top log-prob is exact
    assert (decoded[:, :-1] >= decoded[:, 1:]).all()  # still sorted
    p, q = exact.softmax(-1), decoded.softmax(-1)  # renorm-mode teacher distributions
    assert (p * (p.log() - q.log())).sum(-1).max() < 1e-4


def test_bytes_per_answer_token_at_k64():
    bits = cache_format.id_bits(32000)
    logprobs = -torch.rand(10, 64).sort(-1).values  # descending
    rows = cache_format.encode_topk(torch.randint(0, 32000, (10, 64)), logprobs, bits)
    per_token = sum(t[0].numel() * t.element_size() for t in rows.values())
    assert per_token == 120 + 4 + 4 + 64 <= 200


# -- opening and checking --------------------------------------------------------------------


def test_items_and_manifest(llama_cache):
    cache, model, tok = llama_cache
    assert len(cache) == 15 and cache[-1]["qa_index"] == 14
    counts = cache.manifest["counts"]
    assert counts["shards"] == 4 and counts["items"] == 15
    assert counts["answer_tokens"] == sum(cache[i]["topk_ids"].shape[0] for i in range(len(cache)))
    assert counts["bytes"] == sum(f.stat().st_size for f in cache.path.glob("shard-*.safetensors"))
    with pytest.raises(IndexError):
        cache[15]
    assert TeacherCache(cache.path, model=model, tokenizer=tok, temperature=2.0).manifest == cache.manifest


def test_other_model_tokenizer_vocab_or_temperature_fail(llama_cache):
    cache, model, tok = llama_cache
    other_weights, _ = tiny_model_and_tokenizer("llama", seed=1)
    with pytest.raises(ValueError, match="model: cache made with llama"):
        TeacherCache(cache.path, model=other_weights)
    bigger, _ = tiny_model_and_tokenizer("qwen2")  # another family and vocabulary size
    with pytest.raises(ValueError, match="vocab size: cache 40, model"):
        TeacherCache(cache.path, model=bigger)
    _, other_tok = tiny_model_and_tokenizer("qwen2")
    with pytest.raises(ValueError, match="tokenizer"):
        TeacherCache(cache.path, tokenizer=other_tok)
    with pytest.raises(ValueError, match="temperature: cache 2.0, given 1.0"):
        TeacherCache(cache.path, temperature=1.0)


def test_missing_or_corrupt_manifest(tmp_path, llama_cache):
    with pytest.raises(ValueError, match="manifest.json not found"):
        TeacherCache(tmp_path)
    path = copy_cache(llama_cache[0], tmp_path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt manifest"):
        TeacherCache(path)


def test_truncated_shard_names_the_file(tmp_path, llama_cache):
    path = copy_cache(llama_cache[0], tmp_path)
    shard = path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="shard-00001.safetensors is truncated"):
        TeacherCache(path)


def test_corrupt_shard_names_the_file(tmp_path, llama_cache):
    path = copy_cache(llama_cache[0], tmp_path)
    shard = path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = TeacherCache(path)  # sizes are checked at open, contents when a shard is first read
    cache[0]
    with pytest.raises(InputError, match="shard-00002.safetensors is corrupt"):
        cache[9]


def test_a_tampered_shard_is_refused_on_first_load(tmp_path, llama_cache):
    """Same size, still a valid safetensors file, other log-probs: only the checksum can tell."""
    from safetensors.torch import load_file, save_file

    path = copy_cache(llama_cache[0], tmp_path)
    shard = path / "shard-00001.safetensors"
    tensors = load_file(shard)
    tensors["topk_lp_code"] = 255 - tensors["topk_lp_code"]  # another teacher distribution
    save_file(tensors, shard)
    assert shard.stat().st_size == llama_cache[0].manifest["shards"][1]["bytes"]
    cache = TeacherCache(path)
    with pytest.raises(InputError, match="shard-00001.safetensors is corrupt .*sha256"):
        next(cache.batches(10_000, shuffle=False))
    with pytest.raises(InputError, match="sha256"):
        cache[4]


def test_the_cache_is_a_data_source_with_a_path_free_identity(tmp_path, llama_cache):
    cache, model, tok = llama_cache
    assert isinstance(cache, DataSource)
    moved = TeacherCache(copy_cache(cache, tmp_path))
    identity = cache.identity()
    assert moved.identity() == {**identity, "path": str(tmp_path)}
    assert identity["items"] == 15 and identity["k"] == 8 and identity["temperature"] == 2.0
    cache.check_compatible(model, tok, 2.0)
    with pytest.raises(InputError, match="temperature: cache 2.0, given 3.0"):
        cache.check_compatible(model, tok, 3.0)


def test_missing_shard_names_the_file(tmp_path, llama_cache):
    path = copy_cache(llama_cache[0], tmp_path)
    (path / "shard-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="shard-00003.safetensors is missing"):
        TeacherCache(path)


def test_unsupported_format_version(tmp_path, llama_cache):
    path = copy_cache(llama_cache[0], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99"):
        TeacherCache(path)


# -- packed student batches --------------------------------------------------------------


def test_batches_line_up_with_items(llama_cache):
    cache = llama_cache[0]
    lengths = cache.student_lengths()
    budget = 3 * max(lengths)
    seen = []
    for batch in cache.batches(budget, seed=3):
        T = batch["input_ids"].shape[1]
        assert T <= budget and batch["position_ids"].shape == (1, T) and batch["segment_ids"].shape == (T,)
        assert batch["topk_ids"].shape == batch["topk_logprobs"].shape == (batch["labels"].numel(), cache.k)
        offset, row = 0, 0
        for seg, i in enumerate(batch["indices"]):
            item = cache[i]
            ids, a = item["student_input_ids"], item["answer_start_student"]
            n_ans = len(ids) - a
            assert batch["input_ids"][0, offset: offset + len(ids)].tolist() == ids
            assert batch["position_ids"][0, offset: offset + len(ids)].tolist() == list(range(len(ids)))
            assert (batch["segment_ids"][offset: offset + len(ids)] == seg).all()
            targets = batch["target_positions"][row: row + n_ans]
            assert targets.tolist() == [offset + a - 1 + j for j in range(n_ans)]
            # the hidden state at a target position predicts the next token: the label
            assert batch["input_ids"][0, targets + 1].tolist() == ids[a:] == batch["labels"][row: row + n_ans].tolist()
            assert torch.equal(batch["topk_ids"][row: row + n_ans], item["topk_ids"])
            assert torch.equal(batch["topk_logprobs"][row: row + n_ans], item["topk_logprobs"])
            offset, row = offset + len(ids), row + n_ans
        assert offset == T and row == batch["labels"].numel()
        seen += batch["indices"]
    assert sorted(seen) == list(range(len(cache)))  # each item once per epoch


def test_packed_batch_mask_isolates_sequences(llama_cache):
    batch = next(llama_cache[0].batches(10_000))
    mask = segment_attention_mask(batch["segment_ids"])[0, 0]
    seg = batch["segment_ids"]
    assert not mask[seg[:, None] != seg[None, :]].any()


def test_batch_order_is_a_pure_function_of_seed_and_epoch(llama_cache):
    cache = llama_cache[0]
    budget = 2 * max(cache.student_lengths())

    def order(**kw):
        return [b["indices"] for b in cache.batches(budget, **kw)]

    assert order(seed=1, epoch=2) == order(seed=1, epoch=2)
    assert order(seed=1, epoch=2) != order(seed=1, epoch=3)
    assert order(seed=1, epoch=2) != order(seed=2, epoch=2)
    assert sum(order(shuffle=False), []) == list(range(len(cache)))
    full = order(seed=5)
    assert order(seed=5, start=2) == full[2:]
    assert cache.num_batches(budget, seed=5) == len(full)
    # greedy packing: no two neighbouring batches could have been merged
    lengths = cache.student_lengths()
    sizes = [sum(lengths[i] for i in b) for b in full]
    assert all(sizes[j] + lengths[full[j + 1][0]] > budget for j in range(len(full) - 1))


def test_batches_bad_arguments(llama_cache):
    cache = llama_cache[0]
    with pytest.raises(ValueError, match="smaller than the longest student sequence"):
        next(cache.batches(3))
    with pytest.raises(ValueError, match="batch_tokens"):
        cache.num_batches(0)
    with pytest.raises(ValueError, match="start"):
        next(cache.batches(4096, start=-1))


def test_vocabulary_above_65536_round_trips(tmp_path, monkeypatch):
    from pdengine import prefill as prefill_module
    from pdengine import reference

    # This test is about storage; the op's Triton interpreter would take ~30 s at V=70000.
    monkeypatch.setattr(prefill_module, "teacher_topk", reference.teacher_topk)
    tok = sentence_word_tokenizer()
    model = tiny_model("llama", vocab_size=70_000, num_hidden_layers=2, max_position_embeddings=512)
    cache = prefill(model, tok, DOCUMENTS, QA[:2], tmp_path, k=8, progress=False)
    assert cache.manifest["id_bits"] == 17
    item = cache[0]
    with torch.no_grad():
        logits = model(torch.tensor([item["teacher_input_ids"]])).logits[0].float()
    a = item["answer_start_teacher"]
    full = torch.log_softmax(logits / 2.0, -1)[a - 1: -1]
    assert (full.topk(8).indices == item["topk_ids"]).float().mean() > 0.95
    assert item["topk_ids"].max() >= 2 ** 16  # ids that need the 17th bit survived
    assert item["student_input_ids"][item["answer_start_student"]:] == item["teacher_input_ids"][a:]
