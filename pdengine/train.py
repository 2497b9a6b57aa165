"""The student training engine: a LoRA student learns the teacher's cached top-k.

`train(model, tokenizer, cache, out_dir, config)` trains LoRA adapters on a Hugging Face
causal LM from a `pdengine.TeacherCache` and writes

    OUT/adapter/         the adapter, PEFT format (`pdengine.save_adapter`)
    OUT/checkpoints/     step-NNNNNNN.pt (adapter, optimizer, scheduler, RNG, data position)
    OUT/metrics.jsonl    one line per optimizer step
    OUT/run.json         the configuration and the cache it was trained on

One training step: the packed student batch (sequences end to end, restarted positions,
a block mask so sequences never see each other) goes through the model *body* only;
the final hidden states at the answer positions go, with the lm_head weight (and its
LoRA), into the fused `linear_topk_kl` op: the `[tokens, vocab]` logits never exist.

Three losses, through the same engine so comparisons are fair:
- `pd`: forward KL(teacher || student) over the teacher's cached top-k, at `temperature`
  (default 2.0, no T^2 factor), optionally plus `ce_weight` * cross-entropy.
- `sft`: cross-entropy on the teacher's answer tokens (the same op with k = 1,
  teacher id = label, log-prob 0), closed-book.
- `online_kl`: the paper's original: every step, the teacher (the same model with its
  adapters disabled, document in its prompt) runs forward, and the full-vocabulary KL
  is taken on materialized logits. A baseline; slow and memory-hungry by design.

Replay: `replay_cache` (a second TeacherCache, e.g. a prefill with
`student_sees_document=True`, or a list of examples) is mixed into every
micro-batch: loss = (1 - f) * loss(main) + f * loss(replay), the replay batch holding
about f / (1 - f) times the main batch's tokens. It keeps the student's general skill
(say, reading a document in its prompt) while facts are injected. Plain examples are
dicts `{"input_ids": [...], "answer_start": int}`, trained with cross-entropy on
`input_ids[answer_start:]`.

Defaults follow the paper (Kujanpaa et al. 2024), except the LoRA size: the paper
used rank 1024 / alpha 2048 on 8B models; we default to rank 64 / alpha 128 (the same
alpha = 2 r ratio), a size in common use for models of about 1B parameters and below,
with a small optimizer state; raise it for larger models or many documents. The
paper's lr 1e-5 goes with its rank 1024; smaller ranks usually want a larger lr.

Resumption: data order is a pure function of (seed, epoch), dropout is re-seeded from
(seed, step), and checkpoints hold adapter, optimizer, scheduler, RNG states and the
data position, so `--max-steps 4` then `--resume --max-steps 8` equals 8 steps straight.
The learning-rate schedule spans `epochs` whatever `max_steps` says, for that reason.

Using the loss from your own loop (the engine is optional)::

    import torch, pdengine
    from pdengine.train import TrainConfig, compute_loss

    cfg = TrainConfig(lora_r=16, lora_alpha=32)
    pdengine.add_lora(model, cfg.lora_r, cfg.lora_alpha, target_modules=list(cfg.lora_targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for epoch in range(3):
        for batch in cache.batches(4096, seed=0, epoch=epoch):
            loss = compute_loss(model, batch, cfg)   # batch moved to the model's device
            loss.backward()
            opt.step()
            opt.zero_grad()

With Hugging Face `Trainer`: see `pdengine.integrations.DistillationTrainer`.
"""
from __future__ import annotations

import dataclasses
import io as _io
import json
import math
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pdengine import modeling
from pdengine.io import atomic_write_bytes, atomic_write_json, write_jsonl

LOSSES = ("pd", "sft", "online_kl")
MODES = ("tail", "renorm")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Config fields that change what a run computes: resuming with other values is refused.
_RESUME_MUST_MATCH = (
    "loss", "temperature", "mode", "ce_weight", "lr", "weight_decay", "warmup_ratio",
    "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_lm_head",
    "lora_embeddings", "rslora", "batch_tokens", "grad_accum", "seed", "replay_fraction",
)


class TrainingError(RuntimeError):
    """Training had to stop (non-finite loss); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Hyper-parameters of a student run (paper defaults unless noted).

    loss: "pd" (top-k KL from the cache), "sft" (cross-entropy on the answers) or
        "online_kl" (teacher recomputed every step, full-vocabulary KL).
    temperature: distillation temperature of teacher and student (no T^2 factor); must
        equal the cache's temperature for "pd". "sft" always uses 1.
    mode: "tail" (keeps the teacher's mass outside its top-k) or "renorm".
    ce_weight: extra cross-entropy weight on the answer tokens ("pd" only).
    epochs, lr, weight_decay, warmup_ratio, max_grad_norm: AdamW with linear warmup over
        warmup_ratio of the steps, then linear decay to 0; gradient clipping.
    lora_r, lora_alpha, lora_dropout, lora_targets, lora_lm_head, lora_embeddings, rslora:
        the adapters added when the model has none (see the module docstring for the
        rank choice). lora_embeddings adds "embed_tokens" to the targets.
    batch_tokens: packed tokens per micro-batch; grad_accum: micro-batches per step.
    grad_checkpointing: recompute activations in the backward (less memory, ~30% slower).
    bf16: autocast the forward to bfloat16; None = on CUDA only.
    seed: data order, LoRA init and dropout. save_every: checkpoint every N steps (0: only
        at the end and on Ctrl-C). keep_checkpoints: how many to keep.
    max_steps: stop after this many optimizer steps. The learning-rate schedule still
        spans `epochs` (so a stopped run resumes onto the same schedule); set
        schedule_steps to fix the schedule length yourself.
    replay_fraction: share of each step's loss taken by the replay data (0 <= f < 1).
    progress: show a tqdm bar.
    """

    loss: str = "pd"
    temperature: float = 2.0
    mode: str = "tail"
    ce_weight: float = 0.0
    epochs: int = 10
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    lora_r: int = 64
    lora_alpha: float = 128.0
    lora_dropout: float = 0.05
    lora_targets: tuple = DEFAULT_TARGETS
    lora_lm_head: bool = False
    lora_embeddings: bool = False
    rslora: bool = False
    batch_tokens: int = 4096
    grad_accum: int = 1
    grad_checkpointing: bool = False
    bf16: bool | None = None
    seed: int = 0
    save_every: int = 200
    keep_checkpoints: int = 2
    max_steps: int | None = None
    schedule_steps: int | None = None
    replay_fraction: float = 0.0
    progress: bool = True

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        positive = {"temperature": self.temperature, "lr": self.lr, "epochs": self.epochs,
                    "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
                    "batch_tokens": self.batch_tokens, "grad_accum": self.grad_accum}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name in ("max_steps", "schedule_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        checks = {
            "weight_decay": self.weight_decay >= 0,
            "ce_weight": self.ce_weight >= 0,
            "max_grad_norm": self.max_grad_norm >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "lora_dropout": 0 <= self.lora_dropout < 1,
            "replay_fraction": 0 <= self.replay_fraction < 1,
            "save_every": self.save_every >= 0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


# ----------------------------------------------------------------------------- data


def _as_long(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


def _item_sequence(item: dict):
    """(input_ids, answer_start, topk_ids | None, topk_logprobs | None) of one example:
    a cache item (student side) or a plain `{"input_ids", "answer_start"}` example."""
    if "student_input_ids" in item:
        ids = _as_long(item["student_input_ids"])
        return ids, int(item["answer_start_student"]), item["topk_ids"], item["topk_logprobs"]
    if "input_ids" in item and "answer_start" in item:
        return _as_long(item["input_ids"]), int(item["answer_start"]), None, None
    raise ValueError(
        "each example must be a cache item (student_input_ids, answer_start_student, topk_ids, "
        f"topk_logprobs) or a dict with input_ids and answer_start; got keys {sorted(item)}"
    )


def pack_examples(items, indices=None) -> dict:
    """Pack examples end to end into one student batch (docs/ARCHITECTURE.md format).

    Cache items give their teacher top-k; plain examples get k = 1 targets (their own next
    token, log-prob 0), i.e. cross-entropy. Mixing the two in one batch is refused.
    """
    ids, pos, seg, targets, labels, tk_ids, tk_lp = [], [], [], [], [], [], []
    offset, kinds = 0, set()
    for n, item in enumerate(items):
        seq, start, top_ids, top_lp = _item_sequence(item)
        kinds.add(top_ids is None)
        n_ans = len(seq) - start if top_ids is None else int(torch.as_tensor(top_ids).shape[0])
        if start < 1 or n_ans < 1 or start + n_ans > len(seq):
            raise ValueError(f"example {n}: answer_start {start} does not fit a sequence of {len(seq)} tokens")
        answer = seq[start : start + n_ans]
        if top_ids is None:
            top_ids, top_lp = answer[:, None], torch.zeros(n_ans, 1)
        ids.append(seq)
        pos.append(torch.arange(len(seq)))
        seg.append(torch.full((len(seq),), n, dtype=torch.long))
        targets.append(offset + start - 1 + torch.arange(n_ans))
        labels.append(answer)
        tk_ids.append(torch.as_tensor(top_ids, dtype=torch.long))
        tk_lp.append(torch.as_tensor(top_lp, dtype=torch.float32))
        offset += len(seq)
    if not ids:
        raise ValueError("cannot pack an empty list of examples")
    if len(kinds) > 1 or len({t.shape[1] for t in tk_ids}) != 1:
        raise ValueError("cache items and plain examples (or different top-k sizes) cannot share a batch")
    batch = {
        "input_ids": torch.cat(ids)[None],
        "position_ids": torch.cat(pos)[None],
        "segment_ids": torch.cat(seg),
        "target_positions": torch.cat(targets),
        "labels": torch.cat(labels),
        "topk_ids": torch.cat(tk_ids),
        "topk_logprobs": torch.cat(tk_lp),
        "indices": list(indices) if indices is not None else list(range(len(ids))),
    }
    if True in kinds:
        batch["cross_entropy_only"] = True  # plain examples have no teacher distribution
    return batch


def pack_teacher(items) -> dict:
    """Teacher sequences of cache items (for online_kl) as right-padded rows `[B, L]` with
    an attention mask: teacher sequences are long (document + question + answer), and
    rows keep attention per sequence instead of a `[T, T]` mask over one packed row.
    `target_positions` index the flattened `B * L` positions."""
    seqs = [_as_long(item["teacher_input_ids"]) for item in items]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = []
    for row, (seq, item) in enumerate(zip(seqs, items)):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
        start = int(item["answer_start_teacher"])
        n_ans = int(torch.as_tensor(item["topk_ids"]).shape[0])
        targets.append(row * width + start - 1 + torch.arange(n_ans))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_positions": torch.cat(targets)}


def _sequence_length(item) -> int:
    return len(_item_sequence(item)[0])


class ExampleSource:
    """A list of examples with TeacherCache's `batches` interface (greedy packing up to
    `batch_tokens`; a sequence longer than that gets a batch of its own)."""

    def __init__(self, examples):
        self.examples = list(examples)
        for item in self.examples:
            _item_sequence(item)  # validates the keys up front

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def batches(self, batch_tokens, *, seed=0, epoch=0, shuffle=True, start=0):
        order = list(range(len(self.examples)))
        if shuffle:
            gen = torch.Generator().manual_seed(_mix_seed(seed, epoch))
            order = torch.randperm(len(order), generator=gen).tolist()
        sizes = [_sequence_length(self.examples[i]) for i in order]
        groups = [[order[j] for j in part] for part in modeling.greedy_pack(sizes, batch_tokens)]
        for group in groups[start:]:
            yield pack_examples([self.examples[i] for i in group], indices=group)


def _mix_seed(*parts) -> int:
    """A deterministic 63-bit seed from integers (data order, dropout, per step)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def _as_source(data, name):
    if data is None:
        return None
    if isinstance(data, (list, tuple)) and not hasattr(data, "batches"):
        data = ExampleSource(data)
    if not hasattr(data, "batches") or not hasattr(data, "__len__"):
        raise ValueError(f"{name} must be a TeacherCache or a list of examples, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty: it holds no examples")
    return data


class _Stream:
    """Batches of a source, epoch after epoch, with a resumable position."""

    def __init__(self, source, batch_tokens, seed, epoch=0, index=0, cycle=False):
        self.source, self.batch_tokens, self.seed, self.cycle = source, batch_tokens, seed, cycle
        self.epoch, self.index = epoch, index
        self._it = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def next(self):
        """The next batch, or None at the end of an epoch (when not cycling)."""
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.source.batches(
                    self.batch_tokens, seed=self.seed, epoch=self.epoch, shuffle=True, start=self.index))
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            if not self.cycle:
                return None
        raise ValueError("the replay data yields no batches")


# ----------------------------------------------------------------------------- losses


def _to_device(batch: dict, device) -> dict:
    """Tensors of the batch (and of nested dicts: the packed teacher) on `device`."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        return _to_device(v, device) if isinstance(v, dict) else v

    return {k: move(v) for k, v in batch.items()}


def _target_hidden(model, batch) -> torch.Tensor:
    """Final hidden states at the target positions, `[M, d]`; no logits are formed.

    Packed batches (`segment_ids` present) get the block mask that isolates sequences;
    a batch without `segment_ids` is `[B, T]` rows of one sequence each (optional
    `attention_mask` for right padding), and `target_positions` index the flattened
    `B * T` positions.
    """
    mask = batch.get("attention_mask")
    if "segment_ids" in batch:
        mask = modeling.segment_attention_mask(batch["segment_ids"])
    hidden = modeling.hidden_states(model, batch["input_ids"], batch.get("position_ids"), mask)
    return hidden.reshape(-1, hidden.shape[-1])[batch["target_positions"]]


def _fused_loss_op():
    from pdengine.ops.linear_topk_kl import linear_topk_kl

    return linear_topk_kl


def _head(model):
    from pdengine.lora import lm_head_lora

    return lm_head_lora(model)


def _fused_loss(model, hidden, teacher_ids, teacher_logprobs, labels, *, temperature, mode, ce_weight,
                validate):
    weight, lora_a, lora_b, scale = _head(model)
    return _fused_loss_op()(
        hidden.to(weight.dtype), weight, teacher_ids, teacher_logprobs, labels=labels,
        lora_a=lora_a, lora_b=lora_b, lora_scale=scale, temperature=temperature,
        softcap=modeling.final_logit_softcap(model), mode=mode, ce_weight=ce_weight, validate=validate,
    )


def pd_loss(model, batch, config: TrainConfig, validate: bool = True) -> torch.Tensor:
    """Top-k KL against the cached teacher (+ optional CE), mean over answer tokens."""
    return _fused_loss(
        model, _target_hidden(model, batch), batch["topk_ids"], batch["topk_logprobs"],
        batch["labels"], temperature=config.temperature, mode=config.mode, ce_weight=config.ce_weight,
        validate=validate,
    )


def sft_loss(model, batch, config: TrainConfig, validate: bool = True) -> torch.Tensor:
    """Cross-entropy on the answer tokens: the fused op with k = 1 and log-prob 0."""
    labels = batch["labels"]
    zeros = torch.zeros(labels.shape[0], 1, device=labels.device)
    return _fused_loss(
        model, _target_hidden(model, batch), labels[:, None], zeros, labels,
        temperature=1.0, mode="tail", ce_weight=0.0, validate=validate,
    )


def _teacher_logprobs(model, teacher_batch, temperature) -> torch.Tensor:
    """Full-vocabulary teacher log-probs at the answer positions (adapters disabled)."""
    from pdengine.lora import disable_adapters

    with torch.no_grad(), disable_adapters(model):
        hidden = _target_hidden(model, teacher_batch)
        weight = modeling.output_layer(model).weight
        from pdengine.reference import student_logits

        logits = student_logits(hidden, weight, softcap=modeling.final_logit_softcap(model))
        return torch.log_softmax(logits.float() / temperature, dim=-1)


def online_kl_loss(model, batch, config: TrainConfig, validate: bool = True) -> torch.Tensor:
    """The paper's original loss: teacher forward now, full-vocabulary KL, materialized.

    `batch["teacher"]` holds the packed teacher sequences (`pack_teacher`); the engine
    adds it from the cache items in `batch["indices"]`.
    """
    from pdengine.reference import student_logits

    if "teacher" not in batch:
        raise ValueError("online_kl needs batch['teacher'] (packed teacher sequences; see pack_teacher)")
    teacher = _teacher_logprobs(model, batch["teacher"], config.temperature)
    weight, lora_a, lora_b, scale = _head(model)
    logits = student_logits(_target_hidden(model, batch), weight, lora_a, lora_b, scale,
                            modeling.final_logit_softcap(model))
    student = torch.log_softmax(logits.float() / config.temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


_LOSS_FUNCTIONS = {"pd": pd_loss, "sft": sft_loss, "online_kl": online_kl_loss}


def compute_loss(model, batch: dict, config: TrainConfig, *, validate: bool = True) -> torch.Tensor:
    """The scalar training loss of one packed batch for `config.loss` (batch moved to the
    model's device). Plain examples (`pack_examples` of non-cache dicts) always train with
    cross-entropy. validate: let the fused op check ids and log-probs (one host sync;
    the engine does it on the first batch of each source only)."""
    batch = _to_device(batch, modeling.output_layer(model).weight.device)
    if batch.get("cross_entropy_only"):
        return sft_loss(model, batch, config, validate)
    return _LOSS_FUNCTIONS[config.loss](model, batch, config, validate)


# ----------------------------------------------------------------------------- model set-up


def _has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def prepare_model(model, config: TrainConfig):
    """Add LoRA (when the model has none), freeze everything else; the trainable params."""
    if not _has_lora(model):
        from pdengine.lora import add_lora

        torch.manual_seed(_mix_seed(config.seed, 0x10A))  # LoRA init depends on the seed only
        targets = list(config.lora_targets) + (["embed_tokens"] if config.lora_embeddings else [])
        add_lora(model, config.lora_r, config.lora_alpha, dropout=config.lora_dropout,
                 target_modules=targets, lm_head=config.lora_lm_head, rslora=config.rslora)
    named = {}
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if p.requires_grad:
            named[name] = p
    if not named:
        raise ValueError("the model has no LoRA parameters to train")
    if config.grad_checkpointing:
        _enable_checkpointing(model)
    return named


def _enable_checkpointing(model) -> None:
    """Activation checkpointing of the decoder layers (non-reentrant: LoRA-only grads work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


# ----------------------------------------------------------------------------- run directory


def _cache_identity(cache) -> dict:
    manifest = getattr(cache, "manifest", None) or {}
    ident = {k: manifest[k] for k in ("vocab_size", "k", "temperature") if k in manifest}
    if isinstance(manifest.get("model"), dict):
        ident["model_fingerprint"] = manifest["model"].get("fingerprint")
    ident["path"] = str(getattr(cache, "path", ""))
    ident["len"] = len(cache)
    return ident


def _check_cache(model, tokenizer, cache, config: TrainConfig, name="cache") -> None:
    """The cache must be non-empty and made for this model/vocabulary/temperature."""
    if len(cache) == 0:
        raise ValueError(f"the {name} {getattr(cache, 'path', '')} is empty: it holds no examples")
    temperature = config.temperature if config.loss == "pd" else None
    from pdengine.cache import TeacherCache, check_compatible

    if isinstance(cache, TeacherCache):  # fingerprints of model, tokenizer, vocabulary
        check_compatible(cache.manifest, str(cache.path), model=model, tokenizer=tokenizer,
                         temperature=temperature)
        return
    manifest = getattr(cache, "manifest", None) or {}
    vocab = modeling.output_layer(model).weight.shape[0]
    cache_vocab = manifest.get("vocab_size")
    if cache_vocab is not None and int(cache_vocab) != vocab:
        raise ValueError(
            f"cache was made for a vocabulary of {cache_vocab} tokens, the model has {vocab}: "
            "it belongs to another model; run prefill with this model")
    cache_t = manifest.get("temperature")
    if config.loss == "pd" and cache_t is not None and abs(float(cache_t) - config.temperature) > 1e-6:
        raise ValueError(
            f"temperature {config.temperature} differs from the cache's {cache_t}: the cached "
            "log-probs are normalised at the cache's temperature; pass --temperature to match")


def _check_out_dir(out: Path, config: TrainConfig, cache, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    run_file = out / "run.json"
    taken = [p.name for p in (run_file, out / "metrics.jsonl", out / "checkpoints", out / "adapter") if p.exists()]
    if taken and not resume:
        raise ValueError(
            f"--out {out} already holds a run ({', '.join(taken)}); pass --resume to continue it "
            "or choose another directory")
    if resume and run_file.exists():
        old = json.loads(run_file.read_text())["config"]
        new = config.to_dict()
        diff = [k for k in _RESUME_MUST_MATCH if old.get(k) != new.get(k)]
        if diff:
            raise ValueError(f"cannot resume {out}: config differs in {diff} "
                             f"(was {[old.get(k) for k in diff]}, now {[new.get(k) for k in diff]})")


def _latest_checkpoint(out: Path):
    files = sorted((out / "checkpoints").glob("step-*.pt"))
    return files[-1] if files else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, step: int, params: dict, optimizer, scheduler, position: dict,
                     keep: int) -> Path:
    state = {
        "step": step,
        "adapter": {n: p.detach().cpu() for n, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "position": position,
    }
    buffer = _io.BytesIO()
    torch.save(state, buffer)
    path = out / "checkpoints" / f"step-{step:07d}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in sorted((out / "checkpoints").glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def _load_checkpoint(path: Path, params: dict, optimizer, scheduler) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = sorted(set(params) - set(state["adapter"]))
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model's adapters (missing {missing[:3]}...)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["adapter"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after the checkpoint we resume from."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] <= step]
    if kept:
        write_jsonl(path, kept)
    else:
        path.unlink()


# ----------------------------------------------------------------------------- the engine


class _Trainer:
    """State of one run; `train()` is the public entry point."""

    def __init__(self, model, cache, out, config, replay):
        self.model, self.cache, self.out, self.config = model, cache, out, config
        self.device = modeling.output_layer(model).weight.device
        self.autocast = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        self.params = prepare_model(model, config)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.steps_per_epoch = self._count_steps_per_epoch()
        total = config.schedule_steps or self.steps_per_epoch * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(total, max(1, math.ceil(config.warmup_ratio * total))))
        self.step = 0
        self.main = _Stream(cache, config.batch_tokens, config.seed)
        self.replay_stream = None
        if replay is not None and config.replay_fraction > 0:
            self.replay_stream = _Stream(replay, _replay_tokens(replay, config), _mix_seed(config.seed, 0x5E),
                                         cycle=True)
        self.committed = self._position()
        self.tokens = 0
        self.validated = set()  # sources whose first batch the fused op has checked

    def _count_steps_per_epoch(self) -> int:
        cfg = self.config
        if hasattr(self.cache, "num_batches"):  # TeacherCache plans from lengths only
            n = self.cache.num_batches(cfg.batch_tokens, seed=cfg.seed, epoch=0, shuffle=True)
        else:
            n = sum(1 for _ in self.cache.batches(cfg.batch_tokens, seed=cfg.seed, epoch=0, shuffle=True))
        if n == 0:
            raise ValueError("the cache yields no batches")
        return math.ceil(n / self.config.grad_accum)

    def _position(self) -> dict:
        pos = {"main": self.main.position()}
        if self.replay_stream is not None:
            pos["replay"] = self.replay_stream.position()
        return pos

    def restore(self, path: Path) -> None:
        state = _load_checkpoint(path, self.params, self.optimizer, self.scheduler)
        self.step = state["step"]
        pos = state["position"]
        self.main = _Stream(self.cache, self.config.batch_tokens, self.config.seed, **pos["main"])
        if self.replay_stream is not None and "replay" in pos:
            s = self.replay_stream
            self.replay_stream = _Stream(s.source, s.batch_tokens, s.seed, cycle=True, **pos["replay"])
        self.committed = self._position()

    def checkpoint(self) -> Path:
        return _save_checkpoint(self.out, self.step, self.params, self.optimizer, self.scheduler,
                                self.committed, self.config.keep_checkpoints)

    def _batch_loss(self, batch, source) -> torch.Tensor:
        if self.config.loss == "online_kl" and not batch.get("cross_entropy_only"):
            teacher = pack_teacher([source[i] for i in batch["indices"]])
            batch = dict(batch, teacher=_to_device(teacher, self.device))
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        validate = id(source) not in self.validated
        self.validated.add(id(source))
        with ctx:
            return compute_loss(self.model, batch, self.config, validate=validate)

    def micro_step(self, batch) -> torch.Tensor:
        """Forward + backward of one micro-batch (plus its replay share); the detached loss."""
        f = self.config.replay_fraction
        loss = self._batch_loss(batch, self.cache)
        if self.replay_stream is not None:
            replay = self.replay_stream.next()
            loss = (1 - f) * loss + f * self._batch_loss(replay, self.replay_stream.source)
            self.tokens += replay["input_ids"].numel()
        (loss / self.config.grad_accum).backward()
        self.tokens += batch["input_ids"].numel()
        return loss.detach()

    def optimizer_step(self, loss_sum: torch.Tensor, n_micro: int) -> dict:
        clip = self.config.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip)
        # One host sync per optimizer step: the loss must be checked before the update.
        loss, norm = torch.stack([loss_sum.float() / n_micro, grad_norm.float()]).tolist()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainingError(
                f"non-finite loss ({loss}) or gradient norm ({norm}) at step {self.step + 1}; "
                f"training stopped, the last good checkpoint in {self.out / 'checkpoints'} is kept "
                "(lower --lr, or check the cache)")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.committed = self._position()
        return {"loss": loss, "grad_norm": norm, "lr": lr}

    def run(self, progress) -> list[dict]:
        """Train until `epochs` or `max_steps`; returns the per-step metric rows."""
        cfg, rows, started = self.config, [], time.perf_counter()
        metrics_file = self.out / "metrics.jsonl"
        while self.step < self.total_steps and self.main.epoch < cfg.epochs:
            torch.manual_seed(_mix_seed(cfg.seed, self.step))  # dropout: a function of the step
            loss_sum, n_micro, epoch = None, 0, self.main.epoch
            while n_micro < cfg.grad_accum:
                batch = self.main.next()
                if batch is None:
                    break
                loss = self.micro_step(batch)
                loss_sum = loss if loss_sum is None else loss_sum + loss
                n_micro += 1
            if n_micro == 0:
                continue  # the epoch ended on a step boundary
            row = self.optimizer_step(loss_sum, n_micro)
            elapsed = time.perf_counter() - started
            row.update(step=self.step, epoch=epoch, tokens=self.tokens, elapsed_s=round(elapsed, 3),
                       tokens_per_s=round(self.tokens / max(elapsed, 1e-9), 1))
            rows.append(row)
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.checkpoint()
        return rows


def _replay_tokens(replay, config: TrainConfig) -> int:
    """Replay batch size: f / (1 - f) of the main batch's tokens, at least one sequence."""
    f = config.replay_fraction
    tokens = max(1, round(config.batch_tokens * f / (1 - f)))
    if hasattr(replay, "student_lengths"):  # a TeacherCache refuses batches below its longest item
        tokens = max(tokens, max(replay.student_lengths()))
    return tokens


def _progress_bar(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)


def train(model, tokenizer, cache, out_dir, config: TrainConfig | None = None, *, replay_cache=None,
          resume: bool = False) -> dict:
    """Train a LoRA student on a teacher cache; see the module docstring.

    model: a loaded HF causal LM (LoRA is added from `config` when it has none; all
        non-LoRA parameters are frozen). tokenizer: kept for the adapter's metadata.
    cache: a `TeacherCache` (or a list of cache items). replay_cache: optional
        TeacherCache or list of examples mixed in with `config.replay_fraction`.
    resume: continue from the latest checkpoint in out_dir (a fresh start if there is none).

    Returns dict(steps, epochs, first_loss, final_loss, tokens, seconds, tokens_per_s,
    adapter, checkpoint). Raises ValueError on bad input, TrainingError on a non-finite loss.
    """
    config = config or TrainConfig()
    config.validate()
    cache = _as_source(cache, "cache")
    replay = _as_source(replay_cache, "replay_cache")
    if config.replay_fraction > 0 and replay is None:
        raise ValueError("replay_fraction > 0 needs replay_cache (a TeacherCache or a list of examples)")
    out = Path(out_dir)
    _check_cache(model, tokenizer, cache, config)
    if replay is not None:
        _check_cache(model, tokenizer, replay, config, name="replay_cache")
    _check_out_dir(out, config, cache, resume)
    out.mkdir(parents=True, exist_ok=True)

    was_training = model.training
    model.train()
    trainer = _Trainer(model, cache, out, config, replay)
    latest = _latest_checkpoint(out) if resume else None
    if latest is not None:
        trainer.restore(latest)
    if resume:
        _truncate_metrics(out / "metrics.jsonl", trainer.step)
    atomic_write_json(out / "run.json", {"config": config.to_dict(), "cache": _cache_identity(cache),
                                         "model": getattr(model.config, "_name_or_path", "")})
    started = time.perf_counter()
    progress = _progress_bar(trainer.total_steps, trainer.step, config.progress)
    try:
        rows = trainer.run(progress)
    except KeyboardInterrupt:
        path = trainer.checkpoint()
        progress.close()
        print(f"\ninterrupted: checkpoint of step {trainer.step} saved to {path}; continue with --resume")
        raise
    finally:
        progress.close()
        model.train(was_training)
    checkpoint = trainer.checkpoint()
    from pdengine.lora import save_adapter

    save_adapter(model, out / "adapter")
    seconds = time.perf_counter() - started
    return {
        "steps": trainer.step,
        "epochs": trainer.main.epoch,
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "tokens": trainer.tokens,
        "seconds": seconds,
        "tokens_per_s": trainer.tokens / max(seconds, 1e-9),
        "adapter": str(out / "adapter"),
        "checkpoint": str(checkpoint),
    }


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """Arguments of `pdengine train`."""
    d = TrainConfig.__dataclass_fields__
    parser.add_argument("--model", required=True, help="local Hugging Face causal-LM directory")
    parser.add_argument("--cache", required=True, help="teacher cache directory (pdengine prefill)")
    parser.add_argument("--out", required=True, help="output directory (adapter/, checkpoints/, metrics.jsonl)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--replay-cache", default=None, help="a second teacher cache mixed into every step")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, flag_type in (("loss", str), ("temperature", float), ("mode", str), ("ce_weight", float),
                            ("epochs", int), ("lr", float), ("weight_decay", float),
                            ("warmup_ratio", float), ("max_grad_norm", float), ("lora_r", int),
                            ("lora_alpha", float), ("lora_dropout", float), ("batch_tokens", int),
                            ("grad_accum", int), ("seed", int), ("save_every", int),
                            ("keep_checkpoints", int), ("max_steps", int), ("schedule_steps", int),
                            ("replay_fraction", float)):
        choices = {"loss": LOSSES, "mode": MODES}.get(name)
        parser.add_argument("--" + name.replace("_", "-"), type=flag_type, default=d[name].default,
                            choices=choices, help=f"default: {d[name].default}")
    parser.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                        help="comma-separated module names")
    for flag in ("lora_lm_head", "lora_embeddings", "rslora", "grad_checkpointing"):
        parser.add_argument("--" + flag.replace("_", "-"), action="store_true")
    parser.add_argument("--bf16", default=None, choices=("on", "off"), help="default: on with CUDA")


def config_from_args(args) -> TrainConfig:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    values["lora_targets"] = tuple(t for t in re.split(r"[,\s]+", args.lora_targets) if t)
    values["bf16"] = None if args.bf16 is None else args.bf16 == "on"
    values["progress"] = not args.no_progress
    return TrainConfig(**values)


def run(args) -> int:
    """`pdengine train`: load the model and cache, train, print the summary."""
    from pdengine.cache import TeacherCache
    from pdengine.loading import load_model_and_tokenizer

    try:
        config = config_from_args(args)
        model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
        temperature = config.temperature if config.loss == "pd" else None
        cache = TeacherCache(args.cache, model=model, tokenizer=tokenizer, temperature=temperature)
        replay = None
        if args.replay_cache:
            replay = TeacherCache(args.replay_cache, model=model, tokenizer=tokenizer, temperature=temperature)
        metrics = train(model, tokenizer, cache, args.out, config, replay_cache=replay, resume=args.resume)
    except (ValueError, TrainingError) as e:
        print(f"pdengine train: error: {e}")
        return 2 if isinstance(e, ValueError) else 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(metrics, indent=2))
    return 0
