"""What the training tests share (not a test module): a tiny Llama, teacher cache items
made the way prefill makes them, a small TrainConfig and readers of a run directory.

Cache items: the teacher (the model with a "document" in its prompt) gives its top-k at
temperature T on the answer tokens. Tests use a few steps, small shapes and a large
learning rate so the loss moves quickly.
"""
from __future__ import annotations

import argparse
import json

import torch
from helpers import tiny_model as _tiny_model
from helpers import word_tokenizer

from pdengine import modeling, reference
from pdengine.train import TrainConfig

VOCAB, K, TEMPERATURE = 48, 4, 2.0

WORDS = "Ada lives in Oslo Bob paints bridges at night the cat sat on a mat where does who what did do ? .".split()
DOCUMENTS = [{"id": "ada", "text": "Ada lives in Oslo . the cat sat on a mat ."},
             {"id": "bob", "text": "Bob paints bridges at night ."}]
QA = [{"doc_id": "ada", "question": "where does Ada lives ?", "answer": "in Oslo ."},
      {"doc_id": "bob", "question": "who paints bridges ?", "answer": "Bob ."},
      {"doc_id": "ada", "question": "what did the cat do ?", "answer": "the cat sat on a mat ."},
      {"doc_id": "bob", "question": "what does Bob do at night ?", "answer": "Bob paints bridges ."}]


def tiny_model(seed=0):
    """A 1-layer Llama over VOCAB tokens (the shapes the training tests were written for)."""
    return _tiny_model("llama", vocab_size=VOCAB, seed=seed, tie_word_embeddings=False)


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


def checkpoint_names(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def model_dir(path, seed=0):
    """A tiny 2-layer Llama + word-level tokenizer over WORDS saved as a Hugging Face directory."""
    tokenizer = word_tokenizer(["<pad>", "<eos>", "<unk>", "User:", "Assistant:", *WORDS])
    model = _tiny_model("llama", vocab_size=len(tokenizer), seed=seed, num_hidden_layers=2,
                        max_position_embeddings=128)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def make_cache(tmp_path, qa=QA, name="cache", **kwargs):
    """(model, tokenizer, cache) of a prefill over DOCUMENTS and `qa` with the model in tmp_path/model."""
    from pdengine.prefill import prefill

    model, tokenizer = model_dir(tmp_path / "model")
    cache = prefill(model, tokenizer, DOCUMENTS, qa, tmp_path / name, k=K, temperature=TEMPERATURE,
                    progress=False, **kwargs)
    return model, tokenizer, cache


def cli(argv):
    """`pdengine train ARGV` through its own parser (train's add_arguments and run)."""
    from pdengine.train import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))
