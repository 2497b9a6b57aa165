"""pdengine.cache_format and pdengine.fingerprints: the manifest never trusted blindly
(schema, consistency, checksum, shard paths, shard layout) and a model identified by what
it is, not by the spelling of its path."""
import json
import os
import re
import shutil

import pytest
import torch
from helpers import DOCUMENTS, QA, tiny_model, tiny_model_and_tokenizer

from pdengine import cache_format, fingerprints
from pdengine.cache import TeacherCache
from pdengine.errors import InputError
from pdengine.loading import load_model_and_tokenizer
from pdengine.prefill import prefill


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 5-item cache in 3 shards (2 + 2 + 1), with the model and tokenizer that made it."""
    model, tok = tiny_model_and_tokenizer("llama")
    path = tmp_path_factory.mktemp("cache")
    prefill(model, tok, DOCUMENTS, QA, path, k=4, shard_size=2, progress=False)
    return path, model, tok


@pytest.fixture
def cache_dir(made, tmp_path):
    """A private copy of the cache, to damage."""
    return shutil.copytree(made[0], tmp_path / "cache")


def manifest_of(path):
    return json.loads((path / "manifest.json").read_text())


def write_raw(path, manifest):
    """The manifest as a hand edit leaves it (counts and checksum untouched)."""
    (path / "manifest.json").write_text(json.dumps(manifest))


def read_error(path) -> str:
    with pytest.raises(InputError) as caught:
        cache_format.read_manifest(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path / "manifest.json"))
    return message


# -- the manifest: schema -------------------------------------------------------------------


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _set_shard(key, value):
    return lambda m: m["shards"][0].__setitem__(key, value)


@pytest.mark.parametrize("edit,match", [
    (_set("k", 0), "k must be an int >= 1, got 0"),
    (_set("k", "4"), "k must be an int >= 1"),
    (lambda m: m.pop("shards"), "shards is missing"),
    (_set("shards", []), "shards must be a non-empty list"),
    (_set("shards", {"file": "x"}), "shards must be a non-empty list"),
    (_set("temperature", float("inf")), "temperature must be a finite number > 0"),
    (_set("temperature", 0), "temperature must be a finite number > 0"),
    (_set("temperature", True), "temperature must be a finite number > 0"),
    (_set("student_sees_document", "no"), "student_sees_document must be true or false"),
    (_set("complete", 1), "complete must be true or false"),
    (_set("softcap", -1.0), "softcap must be null or a finite number > 0"),
    (_set("id_bits", 0), "id_bits must be an int from 1 to 32"),
    (_set("vocab_size", 1.5), "vocab_size must be an int >= 2"),
    (lambda m: m["model"].pop("config"), "model.config is missing"),
    (_set("model", "llama"), "model must be an object"),
    (lambda m: m["tokenizer"].__setitem__("size", -1), "tokenizer.size must be an int >= 1"),
    (_set_shard("items", 0), r"shards\[0\].items must be an int >= 1"),
    (_set_shard("sha256", "00"), r"shards\[0\].sha256 must be 64 lowercase hex digits"),
    (lambda m: m["shards"][1].pop("bytes"), r"shards\[1\].bytes is missing"),
    (lambda m: m["shards"].__setitem__(2, "shard-00002.safetensors"), r"shards\[2\] must be an object"),
    (_set("checksum", None), "checksum must be 64 lowercase hex digits"),
])
def test_a_malformed_field_is_named(cache_dir, edit, match):
    manifest = manifest_of(cache_dir)
    edit(manifest)
    write_raw(cache_dir, manifest)
    assert pytest.raises(InputError, TeacherCache, cache_dir).match(match)
    read_error(cache_dir)


@pytest.mark.parametrize("file", ["../shard-00000.safetensors", "/etc/passwd", "sub/../../x", ""])
def test_shard_paths_outside_the_cache_are_refused(cache_dir, file):
    manifest = manifest_of(cache_dir)
    manifest["shards"][0]["file"] = file
    write_raw(cache_dir, manifest)
    assert r"shards[0].file must be a file name inside the cache directory" in read_error(cache_dir)


def test_a_shard_symlink_leading_out_of_the_cache_is_refused(cache_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(cache_dir / "shard-00001.safetensors", outside)
    (cache_dir / "shard-00001.safetensors").unlink()
    os.symlink(outside, cache_dir / "shard-00001.safetensors")
    assert "shard file 'shard-00001.safetensors' lies outside the cache directory" in read_error(cache_dir)
    # A link that stays inside the directory is fine.
    (cache_dir / "shard-00001.safetensors").unlink()
    shutil.move(outside, cache_dir / "real.safetensors")
    os.symlink("real.safetensors", cache_dir / "shard-00001.safetensors")
    assert len(TeacherCache(cache_dir)) == len(QA)


def test_an_older_format_version_says_to_rebuild(cache_dir):
    manifest = manifest_of(cache_dir)
    manifest["format_version"] = 1
    write_raw(cache_dir, manifest)
    assert "format version 1 is not supported (it was made by an older pdengine: re-run prefill" in read_error(cache_dir)


def test_not_a_manifest(cache_dir):
    write_raw(cache_dir, [1, 2])
    assert "not a pdengine-teacher-cache manifest" in read_error(cache_dir)


# -- the manifest: consistency --------------------------------------------------------------


def rewritten(path, edit):
    """The manifest edited, then handed to write_manifest (which recomputes counts and
    checksum, as a careful editor would); returns write_manifest's error."""
    manifest = manifest_of(path)
    edit(manifest)
    with pytest.raises(InputError) as caught:
        cache_format.write_manifest(path, manifest)
    return str(caught.value)


@pytest.mark.parametrize("edit,match", [
    (_set("id_bits", 7), "id_bits is 7, but a vocabulary of .* tokens needs 6"),
    (_set("vocab_size", 1000), "id_bits is 6, but a vocabulary of 1000 tokens needs 10"),
    (_set("k", 10 ** 6), "k is 1000000, larger than the vocabulary"),
    (_set_shard("items", 1), r"shards\[0\].items is 1, but shard_size is 2"),
    (_set("total_items", 9), "the shards hold 5 items, total_items is 9 \\(complete cache\\)"),
    (_set("complete", False), r"shards\[2\].items is 1, but shard_size is 2"),
    (_set("temperature", float("inf")), "temperature must be a finite number > 0"),
])
def test_write_manifest_refuses_what_read_manifest_would(cache_dir, edit, match):
    before = (cache_dir / "manifest.json").read_bytes()
    assert re.search(match, rewritten(cache_dir, edit))
    assert (cache_dir / "manifest.json").read_bytes() == before  # nothing written


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["counts"].__setitem__("items", 4), "counts.items is 4, the shards say 5"),
    (lambda m: m["shards"][0].__setitem__("answer_tokens", 1), "counts.answer_tokens is .*, the shards say"),
    (_set("total_items", 4), "the shards hold 5 items, total_items is 4"),
])
def test_counts_must_agree_with_the_shards(cache_dir, edit, match):
    manifest = manifest_of(cache_dir)
    edit(manifest)
    write_raw(cache_dir, manifest)
    assert re.search(match, read_error(cache_dir))


@pytest.mark.parametrize("key,value", [("temperature", 1.0), ("student_sees_document", True),
                                       ("inputs_fingerprint", "0" * 32), ("softcap", 30.0)])
def test_a_hand_edited_value_breaks_the_checksum(cache_dir, key, value):
    """Well-typed edits no schema can see (a temperature made to match a flag) still fail."""
    manifest = manifest_of(cache_dir)
    manifest[key] = value
    write_raw(cache_dir, manifest)
    assert "checksum does not match the content (the manifest was edited" in read_error(cache_dir)
    with pytest.raises(InputError, match="checksum"):
        TeacherCache(cache_dir, temperature=1.0)


# -- shards: checksum and layout against the manifest --------------------------------------


def test_verify_shard_checks_size_and_sha256(cache_dir):
    manifest = cache_format.read_manifest(cache_dir)
    entry = manifest["shards"][1]
    assert cache_format.verify_shard(cache_dir, entry) == (cache_dir / entry["file"]).read_bytes()
    data = bytearray((cache_dir / entry["file"]).read_bytes())
    data[-1] ^= 0xFF
    (cache_dir / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(InputError, match="shard-00001.safetensors is corrupt \\(sha256"):
        cache_format.verify_shard(cache_dir, entry)
    (cache_dir / entry["file"]).write_bytes(bytes(data[:-10]))
    with pytest.raises(InputError, match="shard-00001.safetensors is truncated or corrupt"):
        cache_format.check_shard_file(cache_dir, entry)
    (cache_dir / entry["file"]).unlink()
    with pytest.raises(InputError, match="shard-00001.safetensors is missing"):
        cache_format.verify_shard(cache_dir, entry)


def test_load_shard_reads_what_prefill_wrote(made):
    path, _, _ = made
    manifest = cache_format.read_manifest(path)
    cache = TeacherCache(path)
    tensors = cache_format.load_shard(path, manifest, 1)
    assert tensors["qa_index"].tolist() == [2, 3]
    assert torch.equal(tensors["topk_lp_code"], cache._shard(1)["topk_lp_code"])


def consistent_rewrite(path, edit):
    """Edit the manifest and rewrite it with write_manifest, so it passes read_manifest."""
    manifest = manifest_of(path)
    edit(manifest)
    cache_format.write_manifest(path, manifest)
    return cache_format.read_manifest(path)


@pytest.mark.parametrize("edit,match", [
    (_set("k", 3), "k \\(topk_lp_code columns\\) is \\(\\d+, 3\\) in the manifest, \\(\\d+, 4\\) in the shard"),
    (_set("student_sees_document", True), "student_sees_document=true\\): missing \\[\\], unexpected "
                                          "\\['student_ids', 'student_offsets'\\]"),
    (lambda m: (m["shards"][0].__setitem__("answer_tokens", m["shards"][0]["answer_tokens"] + 1)),
     "answer_tokens is \\d+ in the manifest, \\d+ in the shard"),
])
def test_a_manifest_that_does_not_describe_its_shards_fails_on_load(cache_dir, edit, match):
    manifest = consistent_rewrite(cache_dir, edit)
    with pytest.raises(InputError, match=match):
        cache_format.load_shard(cache_dir, manifest, 0)


def test_a_replay_cache_flipped_to_a_normal_one_fails_on_load(made, tmp_path):
    _, model, tok = made
    replay = prefill(model, tok, DOCUMENTS, QA[:2], tmp_path / "replay", k=4, progress=False,
                     student_sees_document=True)
    manifest = consistent_rewrite(replay.path, _set("student_sees_document", False))
    with pytest.raises(InputError, match="missing \\['student_ids', 'student_offsets'\\], unexpected \\[\\]"):
        cache_format.load_shard(replay.path, manifest, 0)


# -- fingerprints: what the model is, not where it was loaded from -------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A model directory `data/model` under a fresh root (the root is returned)."""
    root = tmp_path_factory.mktemp("root")
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(root / "data" / "model")
    tok.save_pretrained(root / "data" / "model")
    return root


def test_a_cache_made_from_a_relative_path_fits_the_absolute_path(saved_model, tmp_path, monkeypatch):
    monkeypatch.chdir(saved_model)
    relative = load_model_and_tokenizer("data/model", device="cpu")
    absolute = load_model_and_tokenizer(saved_model.resolve() / "data" / "model", device="cpu")
    assert relative[0].config._name_or_path != absolute[0].config._name_or_path
    assert cache_format.model_fingerprint(relative[0]) == cache_format.model_fingerprint(absolute[0])
    assert cache_format.tokenizer_fingerprint(relative[1]) == cache_format.tokenizer_fingerprint(absolute[1])

    cache = prefill(*relative, DOCUMENTS, QA, tmp_path / "cache", k=4, shard_size=2, progress=False)
    assert "data/model" not in (tmp_path / "cache" / "manifest.json").read_text()
    TeacherCache(cache.path, model=absolute[0], tokenizer=absolute[1], temperature=2.0)
    # Resuming with the other spelling continues the cache instead of refusing it.
    resumed = prefill(*absolute, DOCUMENTS, QA, tmp_path / "cache", k=4, shard_size=2, progress=False)
    assert resumed.manifest == cache.manifest


def test_dtype_is_recorded_but_a_bf16_copy_is_the_same_model(made):
    _, model, _ = made
    fp32 = fingerprints.model_fingerprint(model)
    bf16 = fingerprints.model_fingerprint(tiny_model_and_tokenizer("llama")[0].to(torch.bfloat16))
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert fp32["fingerprint"] == bf16["fingerprint"] and fingerprints.model_differences(fp32, bf16) == []


def test_a_student_with_lora_adapters_fits_its_teachers_cache(made):
    from pdengine.lora import add_lora

    path, model, tok = made
    student = add_lora(tiny_model_and_tokenizer("llama")[0], r=4, alpha=8, lm_head=True)
    assert cache_format.vocab_size_of(student) == cache_format.vocab_size_of(model)
    TeacherCache(path, model=student, tokenizer=tok)


def test_the_real_difference_is_printed(made):
    path, model, tok = made
    vocab = len(tok)
    other_weights = tiny_model_and_tokenizer("llama", seed=1)[0]
    with pytest.raises(InputError, match="model: cache made with llama, given llama: weights: cache hash") as e:
        TeacherCache(path, model=other_weights)
    assert "config." not in str(e.value)
    other_config = tiny_model("llama", vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=512,
                              rope_theta=500000.0)
    with pytest.raises(InputError, match="config.rope_parameters.rope_theta: cache 10000.0, given 500000.0"):
        TeacherCache(path, model=other_config)
    bigger = tiny_model("llama", vocab_size=vocab + 3, num_hidden_layers=2, max_position_embeddings=512)
    with pytest.raises(InputError, match=f"vocab size: cache {vocab}, model {vocab + 3}; model: .*config.vocab_size"):
        TeacherCache(path, model=bigger)
    other_tok = tiny_model_and_tokenizer("qwen2")[1]
    with pytest.raises(InputError, match=f"tokenizer size: cache {vocab} tokens, given {len(other_tok)}"):
        TeacherCache(path, tokenizer=other_tok)
    tok_other_eos = tiny_model_and_tokenizer("llama")[1]
    tok_other_eos.eos_token = "<pad>"
    with pytest.raises(InputError, match="tokenizer special tokens: cache .*eos.*given"):
        TeacherCache(path, tokenizer=tok_other_eos)


def test_an_edited_fingerprint_is_named_when_every_field_agrees(cache_dir, made):
    _, model, _ = made
    consistent_rewrite(cache_dir, lambda m: m["model"].__setitem__("fingerprint", "f" * 32))
    with pytest.raises(InputError, match="model fingerprint: cache f{32}, given .*although config, weights and "
                                         "vocabulary agree \\(was the manifest edited\\?\\)"):
        TeacherCache(cache_dir, model=model)


def test_weight_samples_cover_both_ends_of_large_tensors():
    """Sample positions are exact integers (a float32 linspace ran past the end beyond 2**24)."""
    weight = torch.zeros(2 ** 25 + 3, dtype=torch.int8)
    weight[0], weight[-1] = 1, 2
    sample = torch.frombuffer(bytearray(fingerprints._weight_sample(weight)), dtype=torch.float32)
    assert sample.numel() == fingerprints._SAMPLE and (sample[0], sample[-1]) == (1, 2)
