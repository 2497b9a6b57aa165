"""Pretrain the demo's tiny model to read and to write questions, in the chat format.

Two skills, both in exactly the prompt format pdengine/prompts.py builds:
  reading:  user = document + separator + question  ->  assistant = the answer
            (followed by two more question/answer turns about the same document);
  writing:  user = "Write a question about this text." and the document (either order)
            ->  assistant = one question in a train phrasing about that document.
Loss on assistant tokens only (answer + end of turn). Documents are re-rendered with
fresh templates every step. The gate: open-book reading accuracy on the new people
(never seen in pretraining), greedy decoding, must reach `--gate` (default 0.95).

    python -m pdengine.demo.pretrain --out pdengine/demo/assets --recipe     (the shipped model)
    python -m pdengine.demo.pretrain --out DIR --seed 0 --steps 800           (one stage)

writes a Hugging Face directory (config, model.safetensors, tokenizer) plus pretrain.json.
The shipped model (SHIPPED_RECIPE, seed 1, one thread) took 1573 + 397 + 484 s for its three
stages on this project's shared 2-core CPU (heavily loaded by other jobs during stage 1;
about 0.5-0.8 s per step when the machine is quieter): measured, noisy.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from pdengine.errors import CommandError, InputError

from pdengine.demo import world as W
from pdengine.demo.model import build_tiny_model
from pdengine.demo.tokenizer import build_tokenizer
from pdengine.prompts import DEFAULT_FORMAT


class GateFailed(CommandError, RuntimeError):
    """The tiny model does not read well enough to be a teacher (exit code 1): a failed
    experiment, not bad input; still a RuntimeError for callers that catch that."""

    def __init__(self, message: str):
        super().__init__(message, code=1)

IGNORE = -100


class Encoder:
    """Fast id building for the chat format (checked against prompts.prompt_ids in tests)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        ids = tokenizer.convert_tokens_to_ids
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.user, self.assistant = ids("<|user|>"), ids("<|assistant|>")

    def text(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False).input_ids

    def turn(self, user_text: str, first: bool) -> list[int]:
        head = [self.bos, self.user] if first else [self.user]
        return head + self.text(user_text) + [self.eos, self.assistant]


def reading_user_text(document: str, question: str) -> str:
    return DEFAULT_FORMAT.teacher_user(document, question)


def writing_user_text(document: str, instruction_first: bool) -> str:
    sep = DEFAULT_FORMAT.separator
    if instruction_first:
        return f"{W.QUESTION_WRITING_PROMPT}{sep}{document}"
    return f"{document}{sep}{W.QUESTION_WRITING_PROMPT}"


def _dialogue(enc: Encoder, turns) -> tuple[list[int], list[int]]:
    """turns: [(user_text, assistant_text)]; loss only on assistant text + end of turn."""
    ids, labels = [], []
    for i, (user, reply) in enumerate(turns):
        prompt = enc.turn(user, first=(i == 0))
        reply_ids = enc.text(reply) + [enc.eos]
        ids += prompt + reply_ids
        labels += [IGNORE] * len(prompt) + reply_ids
    return ids, labels


def reading_example(enc: Encoder, entity: W.Entity, rng: random.Random, n_qa: int = 3):
    document = W.render_document(entity, rng)
    attrs = rng.sample(W.ATTRIBUTES, n_qa)
    turns = []
    for i, a in enumerate(attrs):
        q = W.question(entity, a, rng.randrange(len(W.QUESTION_TEMPLATES[a])))
        turns.append((reading_user_text(document, q) if i == 0 else q, entity.facts[a]))
    return _dialogue(enc, turns)


def writing_example(enc: Encoder, entity: W.Entity, rng: random.Random):
    document = W.render_document(entity, rng)
    a = rng.choice(W.ATTRIBUTES)
    q = W.question(entity, a, rng.choice(W.train_phrasings(a)))
    return _dialogue(enc, [(writing_user_text(document, rng.random() < 0.5), q)])


def collate(examples, pad_id: int):
    """Right-padded batch: input_ids, attention_mask, labels."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def greedy_replies(model, tokenizer, user_texts, max_new_tokens: int = 16, batch_size: int = 64,
                   sample: bool = False, seed: int = 0) -> list[str]:
    """Assistant replies to single-turn chat prompts (left padding, batched)."""
    from pdengine.prompts import prompt_ids

    model.eval()
    replies = []
    gen = dict(do_sample=sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if sample:
        torch.manual_seed(seed)
    for start in range(0, len(user_texts), batch_size):
        prompts = [prompt_ids(tokenizer, u) for u in user_texts[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        out = model.generate(input_ids=ids, attention_mask=mask, **gen)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [r.strip() for r in replies]


def reading_accuracy(model, tokenizer, world: W.World, phrasings: str = "all", limit: int | None = None) -> float:
    """Open-book accuracy (exact match) on the new people's documents."""
    users, answers = [], []
    for doc, ent in zip(world.new_documents, world.new_entities):
        for a in W.ATTRIBUTES:
            ps = range(len(W.QUESTION_TEMPLATES[a])) if phrasings == "all" else W.held_out_phrasings(a)
            for p in ps:
                users.append(reading_user_text(doc["text"], W.question(ent, a, p)))
                answers.append(ent.facts[a])
    if limit:
        users, answers = users[:: max(1, len(users) // limit)], answers[:: max(1, len(answers) // limit)]
    replies = greedy_replies(model, tokenizer, users, max_new_tokens=6)
    return sum(r == a for r, a in zip(replies, answers)) / len(answers)


def question_writing_validity(model, tokenizer, world: W.World, n: int = 60, seed: int = 0) -> float:
    """Fraction of sampled questions that are a train phrasing about the document's person."""
    rng = random.Random(seed)
    pairs = [(d, e) for d, e in zip(world.new_documents, world.new_entities)]
    picks = [pairs[i % len(pairs)] for i in range(n)]
    users = [writing_user_text(d["text"], rng.random() < 0.5) for d, _ in picks]
    replies = greedy_replies(model, tokenizer, users, max_new_tokens=16, sample=True, seed=seed)
    valid = 0
    for reply, (_, ent) in zip(replies, picks):
        valid += any(reply == W.question(ent, a, p) for a in W.ATTRIBUTES for p in W.train_phrasings(a))
    return valid / n


def pretrain(out_dir, *, seed: int = 0, steps: int = 800, batch_docs: int = 64, writing_per_step: int = 16,
             qa_per_document: int = 3, init=None, warmup_ratio: float = 0.05,
             lr: float = 1e-3, gate: float = 0.95, threads: int = 2, log_every: int = 100, eval_limit: int | None = None,
             log=print) -> dict:
    """Pretrain from scratch and save the HF directory; returns the metrics (also in pretrain.json).

    Raises GateFailed when the gate (open-book reading accuracy on new people) is not met;
    the model is still saved for inspection.
    """
    if not 1 <= qa_per_document <= len(W.ATTRIBUTES):
        raise InputError(f"qa_per_document must be in 1..{len(W.ATTRIBUTES)}, got {qa_per_document}")
    if steps < 1 or batch_docs < 1:
        raise InputError(f"steps and batch_docs must be >= 1, got {steps}, {batch_docs}")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    world = W.World(seed)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed) if init is None else _load_init(init, tokenizer)
    enc = Encoder(tokenizer)
    rng = random.Random(seed if init is None else seed + 7919)  # a continuation sees new batches
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, max(1, int(steps * warmup_ratio))))
    model.train()
    for step in range(steps):
        people = rng.sample(world.pretrain_entities, batch_docs + writing_per_step)
        examples = [reading_example(enc, e, rng, qa_per_document) for e in people[:batch_docs]]
        examples += [writing_example(enc, e, rng) for e in people[batch_docs:]]
        loss = model(**collate(examples, tokenizer.pad_token_id)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            acc = reading_accuracy(model, tokenizer, world, limit=120)
            model.train()
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} reading(sample) {acc:.3f} "
                f"{time.perf_counter() - t0:.0f}s")
    train_s = time.perf_counter() - t0
    metrics = {
        "seed": seed, "steps": steps, "batch_docs": batch_docs, "writing_per_step": writing_per_step,
        "qa_per_document": qa_per_document, "warmup_ratio": warmup_ratio,
        "init": _init_record(init),
        "lr": lr, "threads": threads, "train_seconds": round(train_s, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "gate_reading_accuracy": reading_accuracy(model, tokenizer, world, limit=eval_limit),
        "held_out_reading_accuracy": reading_accuracy(model, tokenizer, world, phrasings="held_out",
                                                      limit=eval_limit),
        "question_writing_validity": question_writing_validity(model, tokenizer, world, n=eval_limit or 60),
        "gate": gate,
    }
    save_model(model, tokenizer, out_dir, metrics)
    log(json.dumps(metrics))
    if metrics["gate_reading_accuracy"] < gate:
        raise GateFailed(f"pretraining gate failed: open-book reading accuracy "
                           f"{metrics['gate_reading_accuracy']:.3f} < {gate} (saved to {out_dir})")
    return metrics


# How the shipped checkpoint (pdengine/demo/assets) was made: 800 steps from scratch, then two
# continuations at a fresh lr 1e-3 (the reading skill appears attribute by attribute: 0.45
# after stage 1, 0.83 after stage 2, >= 0.95 after stage 3). seed offsets per stage.
SHIPPED_RECIPE = (
    dict(steps=800, seed_offset=0, warmup_ratio=0.05),
    dict(steps=500, seed_offset=0, warmup_ratio=0.02),
    dict(steps=500, seed_offset=1, warmup_ratio=0.02),
)
SHIPPED_SEED = 1


def pretrain_recipe(out_dir, *, seed: int = SHIPPED_SEED, threads: int = 1, gate: float = 0.95, log=print) -> dict:
    """Run SHIPPED_RECIPE (stages in out_dir/stage-N, the final model in out_dir); the gate
    applies to the final model only. seed=SHIPPED_SEED reproduces the shipped checkpoint."""
    out = Path(out_dir)
    init = None
    for n, stage in enumerate(SHIPPED_RECIPE, start=1):
        last = n == len(SHIPPED_RECIPE)
        target = out if last else out / f"stage-{n}"
        log(f"[pretrain] stage {n}/{len(SHIPPED_RECIPE)}: {stage['steps']} steps")
        metrics = pretrain(target, seed=seed + stage["seed_offset"], steps=stage["steps"], init=init,
                           warmup_ratio=stage["warmup_ratio"], threads=threads, gate=gate if last else 0.0,
                           eval_limit=None if last else 240, log=log)
        init = target
    return metrics


def _load_init(init, tokenizer):
    """Continue from a saved demo model (its tokenizer must be the demo tokenizer)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32)
    if model.config.vocab_size != len(tokenizer):
        raise InputError(f"init: {init} has vocabulary {model.config.vocab_size}, expected {len(tokenizer)}")
    return model


def _init_record(init):
    """What a continued run started from (its own pretrain.json), for reproducibility."""
    if init is None:
        return None
    info = Path(init) / "pretrain.json"
    return json.loads(info.read_text()) if info.is_file() else str(init)


def save_model(model, tokenizer, out_dir, metrics: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output HF model directory")
    p.add_argument("--recipe", action="store_true",
                   help="run the shipped checkpoint's 3-stage recipe (seed default 1 = the shipped model)")
    p.add_argument("--seed", type=int, default=None, help="default 0 (1 with --recipe)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-docs", type=int, default=64)
    p.add_argument("--qa-per-document", type=int, default=3)
    p.add_argument("--writing-per-step", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gate", type=float, default=0.95)
    p.add_argument("--init", default=None, help="continue from this saved demo model instead of from scratch")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    try:
        if args.recipe:
            pretrain_recipe(args.out, seed=SHIPPED_SEED if args.seed is None else args.seed, threads=args.threads,
                            gate=args.gate)
            return 0
        pretrain(args.out, seed=args.seed or 0, steps=args.steps, batch_docs=args.batch_docs, lr=args.lr,
                 qa_per_document=args.qa_per_document, writing_per_step=args.writing_per_step,
                 init=args.init, warmup_ratio=args.warmup_ratio,
                 gate=args.gate, threads=args.threads, log_every=args.log_every)
    except GateFailed as e:
        print(e, file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
