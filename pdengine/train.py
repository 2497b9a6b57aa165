"""The student training engine: a LoRA student learns the teacher's cached top-k.

`train(model, tokenizer, cache, out_dir, config)` trains LoRA adapters on a Hugging Face
causal LM from a `pdengine.TeacherCache` and writes

    OUT/adapter/         the adapter, PEFT format (`pdengine.save_adapter`)
    OUT/checkpoints/     step-NNNNNNN.safetensors (adapter, optimizer, scheduler, RNG, data
                         position; no pickle, so loading one cannot run code)
    OUT/metrics.jsonl    one line per optimizer step
    OUT/run.json         the settings, the cache and replay cache it was trained on

The whole run holds OUT's lock (a second trainer on OUT is refused, naming the holder).
The code lives in `pdengine.training` (one module per concern); this module is its
public face: `train`, `TrainConfig`, `TrainingError`, `compute_loss`, `batch_loss`,
`pack_examples`, `pack_teacher`, `ExampleSource`, and the CLI's `add_arguments` / `run`.

Three losses, through the same engine so comparisons are fair (`pdengine.training.losses`):
`pd` (top-k KL against the cached teacher at `temperature`, optionally plus `ce_weight`
cross-entropy), `sft` (cross-entropy on the teacher's answers) and `online_kl` (the
paper's original: teacher recomputed every step, full-vocabulary KL; a slow baseline).

Replay: `replay_cache` (a second TeacherCache, e.g. a prefill with
`student_sees_document=True`, or a list of examples) is mixed into every micro-batch:
loss = (1 - f) * loss(main) + f * loss(replay), the replay batch holding about
f / (1 - f) times the main batch's tokens. Plain examples are dicts
`{"input_ids": [...], "answer_start": int}`, trained with cross-entropy on
`input_ids[answer_start:]`.

Defaults follow the paper (Kujanpaa et al. 2024), except the LoRA size: rank 64 /
alpha 128 (the paper's alpha = 2 r ratio; it used rank 1024 on 8B models, and its lr
1e-5 goes with that rank: smaller ranks usually want a larger lr).

Resumption is exact and keeps the run's settings: `train(..., resume=True)` with
`config=None` (or `pdengine train --out OUT --resume`) reads them from run.json; a change
that alters the result (cache, epochs, lr, schedule, LoRA, seed, ...) is refused, and
`max_steps` may grow, so `--max-steps 4` then `--resume --max-steps 8` equals 8 steps
straight (the learning-rate schedule spans `epochs` whatever `max_steps` says).

Under torchrun (`torchrun --nproc_per_node N -m pdengine train ...`, or `train()` in
processes launched with torchrun's env variables): DDP by default, each step's batch split
by sequences across the ranks and the loss normalized by the global answer-token count, so
N ranks train the one-process adapter up to float reduction order; `fsdp=True` shards the
base per decoder layer with FSDP2 (DCP checkpoints, the same PEFT adapter). Rank 0 holds
the lock and writes OUT (docs/DESIGN.md, "Distributed").

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

Without a TrainConfig: `pdengine.train.batch_loss(model, batch, temperature=2.0)`.
With Hugging Face `Trainer`: see `pdengine.integrations.DistillationTrainer`.
"""
from __future__ import annotations

from pdengine.training.batching import pack_examples, pack_teacher
from pdengine.training.cli import add_arguments, config_from_args, run
from pdengine.training.config import DEFAULT_TARGETS, LOSSES, MODES, RESUMABLE_SETTINGS, TrainConfig
from pdengine.training.loop import TrainingError
from pdengine.training.losses import batch_loss, compute_loss, online_kl_loss, pd_loss, sft_loss
from pdengine.training.model_setup import prepare_model
from pdengine.training.session import train
from pdengine.training.sources import DataSource, ExampleSource

__all__ = ["train", "TrainConfig", "TrainingError", "compute_loss", "batch_loss", "pd_loss", "sft_loss",
           "online_kl_loss", "pack_examples", "pack_teacher", "ExampleSource", "DataSource", "prepare_model",
           "add_arguments", "config_from_args", "run", "LOSSES", "MODES", "DEFAULT_TARGETS",
           "RESUMABLE_SETTINGS"]
