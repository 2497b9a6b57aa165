"""Teacher prefill: shared-prefix rows give the numbers of a full unshared forward, resume,
errors, replay caches, the CLI. Tiny random models of two families (Llama with a word-level
tokenizer and the plain template, Qwen2 with a byte-level BPE tokenizer and a chat template)."""
import argparse
import json

import pytest
import torch
from helpers import DOCUMENTS, QA, tiny_model_and_tokenizer

from pdengine import cache_format
from pdengine import prefill as prefill_module
from pdengine.cache import TeacherCache
from pdengine.errors import InputError
from pdengine.prefill import build_examples, make_groups, pack_rows, prefill, teacher_rows


def setup(family: str, seed: int = 0):
    """(model, tokenizer) of a family: llama + word-level/plain template, qwen2 + BPE/chat template."""
    return tiny_model_and_tokenizer(family, seed)


def quantisation_tolerance(logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row bound of the cache's log-prob encoding error (about span / 255)."""
    span = logprobs[:, :1] - logprobs[:, -1:]
    return span / 250 + 1e-4


def full_forward_logprobs(model, ids, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cached_topk_matches_full_unshared_forward(family, tmp_path):
    model, tok = setup(family)
    cache = prefill(model, tok, DOCUMENTS, QA, tmp_path, k=8, temperature=2.0, progress=False, shard_size=2)
    assert len(cache) == len(QA) and cache.manifest["complete"]
    for i in range(len(cache)):
        item = cache[i]
        a, ids = item["answer_start_teacher"], item["teacher_input_ids"]
        full = full_forward_logprobs(model, ids, 2.0)[a - 1: len(ids) - 1]  # predictions of the answer tokens
        assert item["topk_ids"].shape == (len(ids) - a, 8)
        tol = quantisation_tolerance(item["topk_logprobs"])
        # Tie-safe: the cached ids carry the full forward's log-probs, and those are its top-k.
        assert (full.gather(1, item["topk_ids"]) - item["topk_logprobs"]).abs().le(tol).all()
        assert (full.topk(8).values - item["topk_logprobs"]).abs().le(tol).all()
        assert (full.topk(8).indices == item["topk_ids"]).float().mean() > 0.95
        assert item["student_input_ids"][item["answer_start_student"]:] == ids[a:]
        assert item["qa_index"] == i


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prefix_rows_equal_unshared_forwards(family):
    model, tok = setup(family)
    examples = build_examples(tok, DOCUMENTS, QA)
    shared_groups = make_groups(examples, batch_tokens=4096, share_prefix=True)
    assert len(shared_groups) == 2 and all(g["prefix_len"] > 10 for g in shared_groups)
    shared = teacher_rows(model, shared_groups, k=8, temperature=2.0)  # both documents in one row
    order = [ex["qa_index"] for g in shared_groups for ex in g["items"]]
    unshared = {}
    for group in make_groups(examples, 4096, share_prefix=False):
        unshared[group["items"][0]["qa_index"]] = teacher_rows(model, [group], k=8, temperature=2.0)
    ref_ids = torch.cat([unshared[i][0] for i in order])
    ref_lp = torch.cat([unshared[i][1] for i in order])
    torch.testing.assert_close(shared[1], ref_lp, atol=2e-5, rtol=0)
    assert (shared[0] == ref_ids).float().mean() > 0.95  # ids may differ only at ties


@pytest.mark.parametrize("path", ["mask", "auto"])  # auto: the long document by its prefix KV cache
def test_small_batch_tokens_splits_groups_and_rows_with_same_numbers(tmp_path, path):
    model, tok = setup("llama")
    examples = build_examples(tok, DOCUMENTS, QA)
    longest = max(len(ex["teacher_input_ids"]) for ex in examples)
    small = make_groups(examples, batch_tokens=longest, share_prefix=True, path="mask")
    assert len(small) > 2 and all(len(row) == 1 for row in pack_rows(small, longest))
    big = prefill(model, tok, DOCUMENTS, QA, tmp_path / "big", k=8, progress=False)
    split = prefill(model, tok, DOCUMENTS, QA, tmp_path / "split", k=8, progress=False, batch_tokens=longest,
                    teacher_attention=path)
    for i in range(len(QA)):
        assert big[i]["teacher_input_ids"] == split[i]["teacher_input_ids"]
        tol = quantisation_tolerance(big[i]["topk_logprobs"])
        assert (big[i]["topk_logprobs"] - split[i]["topk_logprobs"]).abs().le(tol).all()


def test_shared_prefix_processes_fewer_tokens():
    model, tok = setup("llama")
    examples = build_examples(tok, DOCUMENTS, QA)
    shared = prefill_module.count_tokens(examples, 4096, share_prefix=True)
    unshared = prefill_module.count_tokens(examples, 4096, share_prefix=False)
    assert unshared == sum(len(ex["teacher_input_ids"]) - 1 for ex in examples)
    assert shared < 0.7 * unshared


def test_resume_after_interrupted_prefill(tmp_path, monkeypatch):
    model, tok = setup("llama")
    real_write, written = cache_format.write_shard, []

    def killed_after_first_shard(directory, index, tensors):
        if written:
            raise KeyboardInterrupt("simulated kill")
        written.append(index)
        return real_write(directory, index, tensors)

    monkeypatch.setattr(cache_format, "write_shard", killed_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        prefill(model, tok, DOCUMENTS, QA, tmp_path, k=8, shard_size=2, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["counts"]["items"] == 2
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(tmp_path)

    resumed_shards = []
    monkeypatch.setattr(cache_format, "write_shard",
                        lambda d, i, t: resumed_shards.append(i) or real_write(d, i, t))
    cache = prefill(model, tok, DOCUMENTS, QA, tmp_path, k=8, shard_size=2, progress=False)
    assert resumed_shards == [1, 2]  # shard 0 was not recomputed
    fresh = prefill(model, tok, DOCUMENTS, QA, tmp_path / "fresh", k=8, shard_size=2, progress=False)
    assert len(cache) == len(fresh) == len(QA)
    for i in range(len(QA)):
        torch.testing.assert_close(cache[i]["topk_logprobs"], fresh[i]["topk_logprobs"])
        assert torch.equal(cache[i]["topk_ids"], fresh[i]["topk_ids"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_removes_temp_files_of_a_killed_write(tmp_path):
    model, tok = setup("llama")
    prefill(model, tok, DOCUMENTS, QA, tmp_path, k=8, shard_size=2, progress=False)
    stale = tmp_path / ".shard-00001.safetensors.abc123.tmp"
    stale.write_bytes(b"half a shard")
    assert len(prefill(model, tok, DOCUMENTS, QA, tmp_path, k=8, shard_size=2, progress=False)) == len(QA)
    assert not stale.exists()


def test_resume_refuses_other_settings_and_force_overwrites(tmp_path):
    model, tok = setup("llama")
    prefill(model, tok, DOCUMENTS, QA, tmp_path, k=8, progress=False)
    with pytest.raises(InputError, match="temperature"):
        prefill(model, tok, DOCUMENTS, QA, tmp_path, k=8, temperature=1.0, progress=False)
    with pytest.raises(InputError, match="inputs_fingerprint"):
        prefill(model, tok, DOCUMENTS, QA[:3], tmp_path, k=8, progress=False)
    other_model, _ = setup("llama", seed=1)
    with pytest.raises(InputError, match="model"):
        prefill(other_model, tok, DOCUMENTS, QA, tmp_path, k=8, progress=False)
    cache = prefill(model, tok, DOCUMENTS, QA[:3], tmp_path, k=4, temperature=1.0, progress=False, resume=False)
    assert len(cache) == 3 and cache.manifest["k"] == 4 and cache.manifest["temperature"] == 1.0


def test_student_sees_document_makes_a_replay_cache(tmp_path):
    model, tok = setup("qwen2")
    cache = prefill(model, tok, DOCUMENTS, QA, tmp_path, k=8, progress=False, student_sees_document=True)
    assert cache.manifest["student_sees_document"]
    for i in range(len(cache)):
        item = cache[i]
        assert item["student_input_ids"] == item["teacher_input_ids"]
        assert item["answer_start_student"] == item["answer_start_teacher"]
    batch = next(cache.batches(4096, shuffle=False))
    first = cache[0]
    n = len(first["teacher_input_ids"])
    assert batch["input_ids"][0, :n].tolist() == first["teacher_input_ids"]
    assert batch["target_positions"][0] == first["answer_start_teacher"] - 1


def test_answer_ids_are_used_as_given(tmp_path):
    model, tok = setup("llama")
    answer_ids = tok("Oslo .", add_special_tokens=False).input_ids
    qa = [{"doc_id": "ada", "question": "Where does Ada live ?", "answer_ids": answer_ids + [tok.eos_token_id]}]
    item = prefill(model, tok, DOCUMENTS, qa, tmp_path, k=8, progress=False)[0]
    assert item["student_input_ids"][item["answer_start_student"]:] == answer_ids + [tok.eos_token_id]


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k must"), (dict(k=10_000), "k=10000"), (dict(temperature=0.0), "temperature"),
    (dict(batch_tokens=0), "batch_tokens"), (dict(shard_size=-1), "shard_size"), (dict(fmt="plain"), "fmt"),
])
def test_bad_settings_raise(tmp_path, kwargs, message):
    model, tok = setup("llama")
    with pytest.raises(InputError, match=message):
        prefill(model, tok, DOCUMENTS, QA, tmp_path, progress=False, **kwargs)


@pytest.mark.parametrize("documents, qa, message", [
    (DOCUMENTS, [{"doc_id": "nope", "question": "q ?", "answer": "a"}], "doc_id 'nope'"),
    (DOCUMENTS, [{"doc_id": "ada", "question": "q ?"}], r"qa_pairs\[0\] needs"),
    (DOCUMENTS, [], "qa_pairs"),
    ("not documents", QA, "documents"),
    (DOCUMENTS + DOCUMENTS[:1], QA, "duplicate"),
])
def test_bad_inputs_raise(tmp_path, documents, qa, message):
    model, tok = setup("llama")
    with pytest.raises(InputError, match=message):
        prefill(model, tok, documents, qa, tmp_path, k=4, progress=False)


def test_documents_may_be_a_dict(tmp_path):
    model, tok = setup("llama")
    cache = prefill(model, tok, {d["id"]: d["text"] for d in DOCUMENTS}, QA, tmp_path, k=4, progress=False)
    assert len(cache) == len(QA)


def test_cli_prefill(tmp_path, capsys):
    model, tok = setup("qwen2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for name, rows in (("docs.jsonl", DOCUMENTS), ("qa.jsonl", QA)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    prefill_module.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--documents", str(tmp_path / "docs.jsonl"),
                              "--qa", str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "cache"), "--k", "4",
                              "--no-progress", "--device", "cpu"])
    assert prefill_module.run(args) == 0
    assert "5 QA pairs" in capsys.readouterr().out
    assert len(TeacherCache(tmp_path / "cache", model=model, tokenizer=tok, temperature=2.0)) == len(QA)
