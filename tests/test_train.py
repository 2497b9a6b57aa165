"""The student training engine (pdengine/train.py) on a tiny random Llama, on CPU.

Cache items are made the way prefill makes them: the teacher (the model with a
"document" in its prompt) gives its top-k at temperature T on the answer tokens. Tests
use a few steps, small shapes and a large learning rate so the loss moves quickly.
"""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pdengine import modeling, reference
from pdengine.cache import TeacherCache
from pdengine.train import TrainConfig, TrainingError, pack_examples, train

VOCAB, K, TEMPERATURE = 48, 4, 2.0


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def teacher_items(model, n=8, seed=1):
    """Cache items: teacher = doc + question + answer, student = question + answer."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        doc = torch.randint(3, VOCAB, (6,), generator=gen).tolist()
        question = torch.randint(3, VOCAB, (3,), generator=gen).tolist()
        answer = torch.randint(3, VOCAB, (4,), generator=gen).tolist() + [1]
        teacher, student = doc + question + answer, question + answer
        start_t = len(doc) + len(question)
        with torch.no_grad():
            hidden = modeling.hidden_states(model, torch.tensor([teacher]))[0]
            rows = hidden[start_t - 1 : start_t - 1 + len(answer)]
            ids, lp = reference.teacher_topk(rows, modeling.output_layer(model).weight, K, TEMPERATURE)
        items.append({"teacher_input_ids": teacher, "student_input_ids": student,
                      "answer_start_teacher": start_t, "answer_start_student": len(question),
                      "topk_ids": ids, "topk_logprobs": lp})
    return items


def config(**overrides):
    base = dict(lr=3e-3, epochs=2, batch_tokens=24, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                warmup_ratio=0.0, save_every=2, progress=False, temperature=TEMPERATURE, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model())


def test_pack_examples_targets_predict_answer_tokens(items):
    batch = pack_examples(items[:3])
    ids = batch["input_ids"][0]
    assert torch.equal(ids[batch["target_positions"] + 1], batch["labels"])
    assert batch["topk_ids"].shape == (batch["labels"].shape[0], K)
    assert batch["position_ids"][0, len(items[0]["student_input_ids"])] == 0  # restarts per sequence


@pytest.mark.parametrize("loss", ["pd", "sft", "online_kl"])
def test_each_loss_trains_and_lowers_the_loss(tmp_path, items, loss):
    model = tiny_model()
    result = train(model, None, items, tmp_path, config(loss=loss, epochs=2, lr=1e-2))
    rows = metrics(tmp_path)
    assert result["steps"] == len(rows) == 6  # 3 packed batches per epoch
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert math.isfinite(last) and last < first
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "checkpoints").glob("step-*.pt"))


def test_resume_gives_the_same_adapter_as_a_straight_run(tmp_path, items):
    straight = tiny_model()
    train(straight, None, items, tmp_path / "a", config(max_steps=8, epochs=5))
    stopped = tiny_model()
    train(stopped, None, items, tmp_path / "b", config(max_steps=4, epochs=5))
    resumed = tiny_model()
    result = train(resumed, None, items, tmp_path / "b", config(max_steps=8, epochs=5), resume=True)
    assert result["steps"] == 8
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [r["step"] for r in metrics(tmp_path / "b")] == list(range(1, 9))
    assert [r["loss"] for r in metrics(tmp_path / "b")] == pytest.approx([r["loss"] for r in metrics(tmp_path / "a")], rel=1e-4)


def test_out_dir_with_another_run_needs_resume(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=1))
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(tiny_model(), None, items, tmp_path, config(max_steps=1))
    with pytest.raises(ValueError, match=r"config differs in \['lr'\]"):
        train(tiny_model(), None, items, tmp_path, config(max_steps=2, lr=1.0), resume=True)


def test_empty_cache_and_vocabulary_mismatch(tmp_path, items):
    with pytest.raises(ValueError, match="cache is empty"):
        train(tiny_model(), None, [], tmp_path / "a", config())

    class OtherVocab(list):
        manifest = {"vocab_size": VOCAB + 1, "temperature": TEMPERATURE}

        def batches(self, *args, **kwargs):
            raise AssertionError("must fail before reading batches")

    with pytest.raises(ValueError, match="vocabulary of 49 tokens, the model has 48"):
        train(tiny_model(), None, OtherVocab(items), tmp_path / "b", config())
    OtherVocab.manifest = {"vocab_size": VOCAB, "temperature": 1.0}
    with pytest.raises(ValueError, match="temperature 2.0 differs from the cache's 1.0"):
        train(tiny_model(), None, OtherVocab(items), tmp_path / "c", config())


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, items):
    model = tiny_model()
    calls = {"n": 0}

    def poison_after_two_steps(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 2 else output

    modeling.model_body(model).norm.register_forward_hook(poison_after_two_steps)
    with pytest.raises(TrainingError, match="non-finite loss.*step 3.*last good checkpoint"):
        train(model, None, items, tmp_path, config(save_every=2))
    assert [p.name for p in (tmp_path / "checkpoints").glob("*.pt")] == ["step-0000002.pt"]
    assert not (tmp_path / "adapter").exists()


def test_replay_examples_are_mixed_into_every_step(tmp_path, items):
    gen = torch.Generator().manual_seed(5)
    replay = [{"input_ids": torch.randint(3, VOCAB, (10,), generator=gen).tolist(), "answer_start": 6}
              for _ in range(3)]
    model = tiny_model()
    train(model, None, items, tmp_path / "mix", config(replay_fraction=0.5, max_steps=3), replay_cache=replay)
    no_replay = tiny_model()
    train(no_replay, None, items, tmp_path / "plain", config(max_steps=3))
    mixed, plain = metrics(tmp_path / "mix"), metrics(tmp_path / "plain")
    assert len(mixed) == 3
    # the replay examples add tokens to every step and change its loss
    assert all(m["tokens"] > p["tokens"] for m, p in zip(mixed, plain))
    assert all(m["loss"] != pytest.approx(p["loss"]) for m, p in zip(mixed, plain))


def test_lm_head_lora_and_gradient_checkpointing_train_the_head(tmp_path, items):
    model = tiny_model()
    train(model, None, items, tmp_path, config(max_steps=2, lora_lm_head=True, grad_checkpointing=True))
    from pdengine.lora import lm_head_lora

    _, _, lora_b, _ = lm_head_lora(model)
    assert lora_b is not None and lora_b.abs().sum() > 0  # B starts at zero: it was trained
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" in saved["target_modules"]


def test_ctrl_c_writes_a_checkpoint_to_resume_from(tmp_path, items):
    model = tiny_model()
    calls = {"n": 0}

    def interrupt_in_step_three(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return output

    handle = modeling.model_body(model).norm.register_forward_hook(interrupt_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        train(model, None, items, tmp_path, config(save_every=0))
    assert [p.name for p in (tmp_path / "checkpoints").glob("*.pt")] == ["step-0000002.pt"]
    handle.remove()
    result = train(tiny_model(), None, items, tmp_path, config(save_every=0), resume=True)
    assert result["steps"] == len(metrics(tmp_path)) and result["steps"] > 2


def test_hugging_face_trainer_runs_two_steps(tmp_path, items):
    from transformers import TrainingArguments

    from pdengine.integrations import CacheDataset, DistillationTrainer, collate_cache_items
    from pdengine.lora import add_lora

    model = add_lora(tiny_model(), 4, 8)
    before = adapter_tensors(model)
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             gradient_accumulation_steps=1)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=CacheDataset(items),
                                  data_collator=collate_cache_items,
                                  distill_config=TrainConfig(temperature=TEMPERATURE))
    out = trainer.train()
    assert out.global_step == 2 and math.isfinite(out.training_loss) and out.training_loss > 0
    after = adapter_tensors(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


WORDS = "Ada lives in Oslo Bob paints bridges at night the cat sat on a mat where does who what did do ? .".split()
DOCUMENTS = [{"id": "ada", "text": "Ada lives in Oslo . the cat sat on a mat ."},
             {"id": "bob", "text": "Bob paints bridges at night ."}]
QA = [{"doc_id": "ada", "question": "where does Ada lives ?", "answer": "in Oslo ."},
      {"doc_id": "bob", "question": "who paints bridges ?", "answer": "Bob ."},
      {"doc_id": "ada", "question": "what did the cat do ?", "answer": "the cat sat on a mat ."},
      {"doc_id": "bob", "question": "what does Bob do at night ?", "answer": "Bob paints bridges ."}]


def model_dir(path, seed=0):
    """A tiny Llama + word-level tokenizer saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "User:", "Assistant:", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def cli(argv):
    import argparse

    from pdengine.train import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def test_cli_trains_from_a_teacher_cache_and_resumes(tmp_path, capsys):
    from pdengine.prefill import prefill

    model, tokenizer = model_dir(tmp_path / "model")
    prefill(model, tokenizer, DOCUMENTS, QA, tmp_path / "cache", k=K, temperature=TEMPERATURE, progress=False)
    common = ["--model", str(tmp_path / "model"), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
              "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--batch-tokens", "32", "--no-progress",
              "--device", "cpu", "--epochs", "3"]
    assert cli([*common, "--max-steps", "2"]) == 0
    assert cli([*common, "--max-steps", "3"]) == 2  # the out dir holds a run
    assert "--resume" in capsys.readouterr().out
    assert cli([*common, "--max-steps", "3", "--resume"]) == 0
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    from pdengine.lora import load_adapter

    reloaded = load_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "model"), tmp_path / "run" / "adapter")
    assert any("lora_" in n for n, _ in reloaded.named_parameters())

    other, _ = model_dir(tmp_path / "other", seed=1)  # same shapes, other weights: not the cache's model
    capsys.readouterr()
    assert cli([*common[:1], str(tmp_path / "other"), *common[2:4], "--out", str(tmp_path / "run2")]) == 2
    assert "does not match" in capsys.readouterr().out
    with pytest.raises(ValueError, match="does not match: model"):
        train(other, tokenizer, TeacherCache(tmp_path / "cache"), tmp_path / "run3", config())


def test_cli_mixes_a_replay_cache_where_the_student_reads_the_document(tmp_path):
    from pdengine.prefill import prefill

    model, tokenizer = model_dir(tmp_path / "model")
    prefill(model, tokenizer, DOCUMENTS, QA[:2], tmp_path / "cache", k=K, temperature=TEMPERATURE, progress=False)
    replay = prefill(model, tokenizer, DOCUMENTS, QA[2:], tmp_path / "replay", k=K, temperature=TEMPERATURE,
                     progress=False, student_sees_document=True)
    assert len(replay[0]["student_input_ids"]) > len(replay[0]["teacher_input_ids"]) - 1  # document included
    argv = ["--model", str(tmp_path / "model"), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--lora-r", "4", "--lora-alpha", "8", "--batch-tokens", "32", "--no-progress", "--device", "cpu",
            "--epochs", "2", "--replay-cache", str(tmp_path / "replay"), "--replay-fraction", "0.3"]
    assert cli(argv) == 0
    rows = metrics(tmp_path / "run")
    main_tokens = sum(len(TeacherCache(tmp_path / "cache")[i]["student_input_ids"]) for i in range(2))
    assert len(rows) == 2  # one main batch per epoch ...
    assert all(r["tokens"] > main_tokens * r["step"] for r in rows)  # ... plus replay tokens every step


def test_plain_pytorch_loop_from_the_docstring(items):
    """The loop in pdengine.train's module docstring, on a list-backed source."""
    from pdengine.lora import add_lora
    from pdengine.train import ExampleSource, compute_loss

    model = tiny_model()
    cfg = TrainConfig(temperature=TEMPERATURE)
    add_lora(model, 4, 8, target_modules=list(cfg.lora_targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for epoch in range(3):
        for batch in ExampleSource(items).batches(64, seed=0, epoch=epoch):
            loss = compute_loss(model, batch, cfg)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_online_kl_teacher_rows_match_one_forward_per_sequence(items):
    from pdengine.train import _teacher_logprobs, pack_teacher

    model = tiny_model()
    got = _teacher_logprobs(model, pack_teacher(items[:3]), TEMPERATURE)
    want = []
    with torch.no_grad():
        for item in items[:3]:
            logits = model(torch.tensor([item["teacher_input_ids"]])).logits[0]
            start, n = item["answer_start_teacher"], len(item["topk_ids"])
            want.append(torch.log_softmax(logits[start - 1 : start - 1 + n] / TEMPERATURE, -1))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)
    # and the cached top-k (made from the same teacher) is its top-k
    top = torch.cat([torch.as_tensor(item["topk_ids"]) for item in items[:3]])
    torch.testing.assert_close(got.gather(1, top), torch.cat(want).gather(1, top))
    assert torch.equal(got.topk(K, dim=-1).indices.sort(-1).values, top.sort(-1).values)
