"""The training loop: `train(model, tokenizer, cache, out_dir, config)` (docs/DESIGN.md, "Training").

One optimizer step = `grad_accum` micro-batches of the main source (plus, with replay,
a replay batch mixed into each: loss = (1 - f) * loss(main) + f * loss(replay)), one
clip, one AdamW update. Exact resumption: data order is a pure function of (seed,
epoch), dropout is re-seeded from (seed, step), and a checkpoint holds adapter,
optimizer, scheduler, RNG states and the data positions, so 4 steps + resume to 8 equal
8 steps straight. The whole run holds the output directory's lock.

With `val_fraction`, a fixed share of the cache's QA pairs is held out (never trained on)
and its mean loss per answer token, model in eval mode, is `val_loss` in metrics.jsonl
every `eval_every` steps (0: every epoch's worth of steps) and at a run's last step.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from pdengine import modeling
from pdengine.errors import InputError
from pdengine.loading import attention_implementation_of
from pdengine.locking import DirectoryLock
from pdengine.training import checkpoints, prompt_record, run_dir, tensorboard_log
from pdengine.training.batching import mix_seed, pack_teacher
from pdengine.training.config import TrainConfig
from pdengine.training.losses import compute_loss, to_device
from pdengine.training.model_setup import prepare_model
from pdengine.training.sources import DataSource, Stream, as_source, split_validation


class TrainingError(RuntimeError):
    """Training had to stop (non-finite loss); the last good checkpoint is kept."""


def _lr_lambda(total_steps: int, warmup_steps: int, schedule: str = "linear"):
    """Linear warmup, then a linear or cosine decay that reaches 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":  # 0.5 (1 + cos(pi * progress)), progress = 1 - remaining
            return 0.5 * (1.0 + math.cos(math.pi * (1.0 - remaining)))
        return remaining

    return factor


def _replay_tokens(replay: DataSource, config: TrainConfig) -> int:
    """Replay batch size: f / (1 - f) of the main batch's tokens, at least what the source accepts."""
    f = config.replay_fraction
    return max(1, round(config.batch_tokens * f / (1 - f)), replay.min_batch_tokens())


class Trainer:
    """State of one run: model, optimizer, schedule, data streams and the step counter."""

    def __init__(self, model, cache: DataSource, out: Path, config: TrainConfig, replay: DataSource | None,
                 val: DataSource | None = None):
        self.model, self.cache, self.out, self.config, self.val = model, cache, out, config, val
        self.device = modeling.output_layer(model).weight.device
        self.autocast = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        self.params = prepare_model(model, config)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.lr, weight_decay=config.weight_decay)
        n_batches = cache.num_batches(config.batch_tokens, seed=config.seed, epoch=0, shuffle=True)
        if n_batches == 0:
            raise InputError("the cache yields no batches")
        self.steps_per_epoch = math.ceil(n_batches / config.grad_accum)
        total = config.schedule_steps or self.steps_per_epoch * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(total, max(1, math.ceil(config.warmup_ratio * total)), config.schedule))
        self.step = 0
        self.main = Stream(cache, config.batch_tokens, config.seed)
        self.replay = None
        if replay is not None and config.replay_fraction > 0:
            self.replay = Stream(replay, _replay_tokens(replay, config), mix_seed(config.seed, 0x5E), cycle=True)
        self.committed = self._position()
        self.tokens = 0
        self.validated = set()  # sources whose first batch the fused op has checked
        self.on_first_step = None  # called once the first optimizer step has succeeded

    def _position(self) -> dict:
        pos = {"main": self.main.position()}
        if self.replay is not None:
            pos["replay"] = self.replay.position()
        return pos

    def restore(self, path: Path) -> None:
        state = checkpoints.load_checkpoint(path, self.params, self.optimizer, self.scheduler)
        self.step = int(state["step"])
        self.main = self.main.at(state["position"]["main"])
        if self.replay is not None and "replay" in state["position"]:
            self.replay = self.replay.at(state["position"]["replay"])
        self.committed = self._position()

    def checkpoint(self) -> Path:
        return checkpoints.save_checkpoint(self.out, self.step, self.params, self.optimizer, self.scheduler,
                                           self.committed, self.config.keep_checkpoints)

    def epochs_run(self) -> int:
        """Epochs this run has trained in, fully or partly (3 epochs run: 3)."""
        return min(self.config.epochs, math.ceil(self.step / self.steps_per_epoch))

    def _loss(self, batch, source: DataSource) -> torch.Tensor:
        if self.config.loss == "online_kl" and not batch.get("cross_entropy_only"):
            teacher = pack_teacher([source[i] for i in batch["indices"]])
            batch = dict(batch, teacher=to_device(teacher, self.device))
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        validate = id(source) not in self.validated
        self.validated.add(id(source))
        with ctx:
            return compute_loss(self.model, batch, self.config, validate=validate)

    def micro_step(self, batch) -> torch.Tensor:
        """Forward + backward of one micro-batch (plus its replay share); the detached loss."""
        f = self.config.replay_fraction
        loss = self._loss(batch, self.cache)
        if self.replay is not None:
            replay = self.replay.next()
            loss = (1 - f) * loss + f * self._loss(replay, self.replay.source)
            self.tokens += replay["input_ids"].numel()
        (loss / self.config.grad_accum).backward()
        self.tokens += batch["input_ids"].numel()
        return loss.detach()

    def _non_finite(self, loss: float, norm: float) -> TrainingError:
        latest = checkpoints.latest_checkpoint(self.out)
        kept = (f"the last good checkpoint {latest} is kept; resume from it with --resume" if latest else
                "no checkpoint was saved yet")
        return TrainingError(f"non-finite loss ({loss}) or gradient norm ({norm}) at step {self.step + 1}; "
                             f"training stopped, {kept} (lower --lr, or check the cache)")

    def optimizer_step(self, loss_sum: torch.Tensor, n_micro: int) -> dict:
        clip = self.config.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip)
        # One host sync per optimizer step: the loss must be checked before the update.
        loss, norm = torch.stack([loss_sum.float() / n_micro, grad_norm.float()]).tolist()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise self._non_finite(loss, norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.committed = self._position()
        if self.on_first_step is not None:
            self.on_first_step()
            self.on_first_step = None
        return {"loss": loss, "grad_norm": norm, "lr": lr}

    def validation_loss(self) -> float:
        """Mean loss per answer token over the held-out items (no dropout, no gradient)."""
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        try:
            with torch.no_grad():
                for batch in self.val.batches(self.config.batch_tokens, shuffle=False):
                    n = batch["labels"].numel()
                    total += float(self._loss(batch, self.val)) * n
                    tokens += n
        finally:
            self.model.train(was_training)
        return total / max(tokens, 1)

    def validation_due(self) -> bool:
        """Every `eval_every` steps (0: every epoch's worth of steps) and at the last step."""
        if self.val is None:
            return False
        every = self.config.eval_every or self.steps_per_epoch
        return self.step % every == 0 or self.step >= self.total_steps

    def _accumulate(self):
        """(summed loss, micro-batches) of one optimizer step; (None, 0) at an epoch's end."""
        loss_sum, n_micro = None, 0
        while n_micro < self.config.grad_accum:
            batch = self.main.next()
            if batch is None:
                break
            loss = self.micro_step(batch)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            n_micro += 1
        return loss_sum, n_micro

    def run(self, progress, writer=None) -> list[dict]:
        """Train until `epochs` or `max_steps`; returns the per-step metric rows."""
        cfg, rows, started = self.config, [], time.perf_counter()
        while self.step < self.total_steps and self.main.epoch < cfg.epochs:
            torch.manual_seed(mix_seed(cfg.seed, self.step))  # dropout: a function of the step
            epoch = self.main.epoch
            loss_sum, n_micro = self._accumulate()
            if n_micro == 0:
                continue  # the epoch ended on a step boundary
            row = self.optimizer_step(loss_sum, n_micro)
            elapsed = time.perf_counter() - started
            row.update(step=self.step, epoch=epoch, tokens=self.tokens, elapsed_s=round(elapsed, 3),
                       tokens_per_s=round(self.tokens / max(elapsed, 1e-9), 1))
            if self.validation_due():
                row["val_loss"] = self.validation_loss()
            rows.append(row)
            tensorboard_log.log_row(writer, row)
            run_dir.append_metrics(self.out, row)
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.checkpoint()
        return rows


def _progress_bar(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)


def _resolve_config(out: Path, config: TrainConfig | None, resume: bool):
    """(config, the saved run or None): a resume without a config takes run.json's."""
    run = run_dir.read_run(out) if resume else None
    if run is not None and config is None:
        config = run_dir.saved_config(run, out)
    config = config or TrainConfig()
    config.validate()
    return config, run


def train(model, tokenizer, cache, out_dir, config: TrainConfig | None = None, *, replay_cache=None,
          resume: bool = False) -> dict:
    """Train a LoRA student on a teacher cache; see the `pdengine.train` docstring.

    model: a loaded HF causal LM (LoRA is added from `config` when it has none; all
        non-LoRA parameters are frozen). tokenizer: checked against the cache.
    cache: a `TeacherCache` (or a list of cache items). replay_cache: optional
        TeacherCache or list of examples mixed in with `config.replay_fraction`.
    resume: continue the run in out_dir (a fresh start if it holds none); `config=None`
        takes the run's own settings, a given config may differ only in what does not
        change the result (`RESUMABLE_SETTINGS`: max_steps, save_every, progress, ...).

    Returns dict(steps, epochs, first_loss, final_loss, val_loss (the last; None without
    val_fraction), tokens, seconds, tokens_per_s,
    adapter, checkpoint). Raises InputError on bad input, TrainingError on a non-finite loss.
    """
    out = Path(out_dir)
    with DirectoryLock(out, purpose="pdengine train"):
        config, run = _resolve_config(out, config, resume)
        cache, replay = _sources(model, tokenizer, cache, replay_cache, config)
        identities = (cache.identity(), replay.identity() if replay is not None else None)
        if run is not None:
            run_dir.check_resume(out, run, config, *identities)
        elif resume and checkpoints.latest_checkpoint(out) is not None:
            raise InputError(f"{out} holds checkpoints but no run.json: it is not known what run they "
                             f"belong to; remove {out} to start afresh")
        else:
            run_dir.check_fresh(out)
        checkpoints.remove_stale_temp_files(out)
        return _train_locked(model, cache, replay, out, config, resume, identities)


def _sources(model, tokenizer, cache, replay_cache, config: TrainConfig):
    cache = as_source(cache, "cache")
    replay = as_source(replay_cache, "replay_cache")
    if config.replay_fraction > 0 and replay is None:
        raise InputError("replay_fraction > 0 needs replay_cache (a TeacherCache or a list of examples)")
    if config.replay_fraction == 0:
        replay = None  # unused: neither trained on nor part of the run's identity
    temperature = config.temperature if config.loss == "pd" else None
    for source in (cache, replay):
        if source is not None:
            source.check_compatible(model, tokenizer, temperature)
    return cache, replay


def _train_locked(model, cache, replay, out: Path, config: TrainConfig, resume: bool, identities) -> dict:
    was_training = model.training
    model.train()
    trained, val = split_validation(cache, config.val_fraction)
    trainer = Trainer(model, trained, out, config, replay, val)
    latest = checkpoints.latest_checkpoint(out) if resume else None
    if latest is not None:
        trainer.restore(latest)
    if resume:
        run_dir.repair_metrics(out, trainer.step)
    name = str(getattr(model.config, "_name_or_path", "") or "")
    prompt = prompt_record.prompt_of(cache)
    attn = attention_implementation_of(model)
    trainer.on_first_step = lambda: run_dir.write_run(out, config, *identities, name, prompt, attn)
    started = time.perf_counter()
    progress = _progress_bar(trainer.total_steps, trainer.step, config.progress)
    writer = tensorboard_log.open_writer(out, config.tensorboard)
    try:
        rows = trainer.run(progress, writer)
    except KeyboardInterrupt:
        progress.close()
        if trainer.step > 0:  # before the first step there is no run to continue
            path = trainer.checkpoint()
            print(f"\ninterrupted: checkpoint of step {trainer.step} saved to {path}; continue with --resume",
                  file=sys.stderr)
        raise
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        model.train(was_training)
    return _finish(model, trainer, rows, out, time.perf_counter() - started)


def _finish(model, trainer: Trainer, rows: list, out: Path, seconds: float) -> dict:
    from pdengine.lora import save_adapter

    checkpoint = trainer.checkpoint()
    save_adapter(model, out / "adapter")
    return {
        "steps": trainer.step,
        "epochs": trainer.epochs_run(),
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
        "tokens": trainer.tokens,
        "seconds": seconds,
        "tokens_per_s": trainer.tokens / max(seconds, 1e-9),
        "adapter": str(out / "adapter"),
        "checkpoint": str(checkpoint),
    }
