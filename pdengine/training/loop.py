"""The training loop: `train(model, tokenizer, cache, out_dir, config)` (docs/DESIGN.md, "Training").

One optimizer step = `grad_accum` micro-batches of the main source (plus, with replay,
a replay batch mixed into each: loss = (1 - f) * loss(main) + f * loss(replay)), one
clip, one AdamW update. Exact resumption: data order is a pure function of (seed,
epoch), dropout is re-seeded from (seed, step), and a checkpoint holds adapter,
optimizer, scheduler, RNG states and the data positions, so 4 steps + resume to 8 equal
8 steps straight. The whole run holds the output directory's lock.

Under torchrun every rank runs this loop on the same global batches and computes its share
of each (`pdengine.training.parallel`: DDP by gradient sum; `pdengine.training.fsdp` with
`fsdp`); rank 0 alone holds the lock, writes OUT and shows progress (docs/DESIGN.md,
"Distributed").

With `val_fraction`, a fixed share of the cache's QA pairs is held out (never trained on)
and its mean loss per answer token, model in eval mode, is `val_loss` in metrics.jsonl
every `eval_every` steps (0: every epoch's worth of steps) and at a run's last step.
"""
from __future__ import annotations

import math
import random
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from pdengine import distributed, modeling
from pdengine.errors import InputError
from pdengine.loading import attention_implementation_of
from pdengine.locking import DirectoryLock
from pdengine.training import checkpoints, fsdp, parallel, prompt_record, run_dir, tensorboard_log
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
                 val: DataSource | None = None, ctx: distributed.Context | None = None):
        self.model, self.cache, self.out, self.config, self.val = model, cache, out, config, val
        self.ctx = ctx or distributed.Context()
        self.device = modeling.output_layer(model).weight.device
        self.autocast = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        self.params = prepare_model(model, config)
        parallel.broadcast_parameters(self.ctx, self.params.values())  # before FSDP shards them
        self.sharded = config.fsdp  # train() checks that it runs under torchrun
        if self.sharded:
            fsdp.shard_model(model, self.ctx, config.fsdp_bf16)
            self.params = fsdp.trainable(model)
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
        if checkpoints.is_sharded_checkpoint(path) != self.sharded:
            kind = "an FSDP (--fsdp)" if self.sharded else "a one-process or DDP"
            raise InputError(f"{path} does not fit {kind} run: remove it (or {self.out}) to start afresh")
        if self.sharded:
            state = fsdp.load(path, self.model, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            version, internal, gauss = state["python_rng"]
            random.setstate((version, tuple(internal), gauss))
        else:  # rank 0 reads the file, every rank applies it: only rank 0 needs to see OUT
            loaded = parallel.on_every_rank(
                self.ctx, lambda: checkpoints.read_checkpoint(path) if self.ctx.is_main else None)
            tensors, state = self.ctx.broadcast(loaded)
            checkpoints.apply_checkpoint(path, tensors, state, self.params, self.optimizer, self.scheduler)
        self._check_world_size(path, int(state.get("world_size", 1)))
        self.step = int(state["step"])
        self.main = self.main.at(state["position"]["main"])
        if self.replay is not None and "replay" in state["position"]:
            self.replay = self.replay.at(state["position"]["replay"])
        self.committed = self._position()

    def _check_world_size(self, path: Path, saved: int) -> None:
        """Another number of ranks splits the batches differently: the same result (up to float
        order) without LoRA dropout; with it the masks fall on other tokens, so it is refused."""
        if saved != self.ctx.world_size and self.config.lora_dropout > 0:
            raise InputError(f"{path} was trained by {saved} rank(s), this job has {self.ctx.world_size}: with "
                             f"lora_dropout {self.config.lora_dropout} the dropout masks depend on the split, so "
                             f"resume with {saved} rank(s) (without dropout any number works)")

    def checkpoint(self) -> Path:
        """Save the step's checkpoint: rank 0 alone (DDP: the state is replicated) or, with
        FSDP, every rank its shards (collective)."""
        if self.sharded:
            meta = {"step": self.step, "position": self.committed, "scheduler": self.scheduler.state_dict(),
                    "world_size": self.ctx.world_size, "python_rng": random.getstate()}
            final = checkpoints.checkpoint_path(self.out, self.step, "dcp")
            path = fsdp.save(self.ctx, final.parent / f".{final.name}.tmp", final, self.model, self.optimizer, meta)
            if self.ctx.is_main:
                checkpoints.prune_checkpoints(self.out, self.config.keep_checkpoints)
            return path
        path = checkpoints.checkpoint_path(self.out, self.step)
        if self.ctx.is_main:
            checkpoints.save_checkpoint(self.out, self.step, self.params, self.optimizer, self.scheduler,
                                        self.committed, self.config.keep_checkpoints, self.ctx.world_size)
        return path

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

    def _share_loss(self, batch, source: DataSource) -> torch.Tensor:
        """This rank's part of the batch's mean loss: its sequences' mean times their share
        of the answer tokens, so the ranks' parts sum to the one-process mean
        (`pdengine.training.parallel`). One process: the batch's mean loss."""
        if not self.ctx.distributed:
            return self._loss(batch, source)
        local, n_local, n_total = parallel.split_batch(batch, self.ctx.rank, self.ctx.world_size)
        return self._loss(local, source) * (n_local / n_total)

    def micro_step(self, batch) -> torch.Tensor:
        """Forward + backward of one micro-batch (plus its replay share); the detached loss
        (this rank's part under torchrun; `optimizer_step` sums the parts)."""
        f = self.config.replay_fraction
        loss = self._share_loss(batch, self.cache)
        if self.replay is not None:
            replay = self.replay.next()
            loss = (1 - f) * loss + f * self._share_loss(replay, self.replay.source)
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
        params = list(self.params.values())
        parallel.sync_gradients(self.ctx, params)  # DDP: every LoRA gradient; FSDP: the replicated ones
        if self.sharded:
            grad_norm = parallel.clip_sharded_grad_norm(self.ctx, params, clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if self.ctx.distributed:
            loss_sum = self.ctx.all_reduce_sum(loss_sum.detach().float().clone())
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
                    local, n, _ = parallel.split_batch(batch, self.ctx.rank, self.ctx.world_size)
                    total += float(self._loss(local, self.val)) * n
                    tokens += n
        finally:
            self.model.train(was_training)
        if self.ctx.distributed:  # the ranks' sums over their sequences
            total, tokens = self.ctx.all_reduce_sum(torch.tensor([total, tokens], dtype=torch.float64)).tolist()
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
            if self.ctx.is_main:
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
    out, ctx = Path(out_dir), distributed.context()
    with ExitStack() as stack:  # rank 0 holds OUT's lock for the whole run (under torchrun: for the job)
        config, run = parallel.on_every_rank(ctx, lambda: _open_run(stack, ctx, out, config, resume))
        config = ctx.broadcast(config)  # run.json is read by rank 0 only: other nodes need not see OUT
        cache, replay, identities = parallel.on_every_rank(
            ctx, lambda: _check_run(ctx, model, tokenizer, cache, replay_cache, out, config, run, resume))
        return _train_locked(model, cache, replay, out, config, resume, identities, ctx)


def _open_run(stack: ExitStack, ctx, out: Path, config, resume: bool):
    """Rank 0: take OUT's lock, read the run's settings. Other ranks: (None, None)."""
    if not ctx.is_main:
        return None, None
    stack.enter_context(DirectoryLock(out, purpose="pdengine train"))
    return _resolve_config(out, config, resume)


def _check_run(ctx, model, tokenizer, cache, replay_cache, out: Path, config: TrainConfig, run, resume: bool):
    """Every rank checks its data against its model; rank 0 checks OUT (a resume keeps the run)."""
    if config.fsdp and not ctx.distributed:
        raise InputError("fsdp shards the model across the processes of a torchrun job: launch with "
                         "torchrun --nproc_per_node N (N > 1), or train without --fsdp")
    cache, replay = _sources(model, tokenizer, cache, replay_cache, config)
    identities = (cache.identity(), replay.identity() if replay is not None else None)
    if not ctx.is_main:
        return cache, replay, identities
    if run is not None:
        run_dir.check_resume(out, run, config, *identities)
    elif resume and checkpoints.latest_checkpoint(out) is not None:
        raise InputError(f"{out} holds checkpoints but no run.json: it is not known what run they "
                         f"belong to; remove {out} to start afresh")
    else:
        run_dir.check_fresh(out)
    checkpoints.remove_stale_temp_files(out)
    return cache, replay, identities


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


def _train_locked(model, cache, replay, out: Path, config: TrainConfig, resume: bool, identities, ctx) -> dict:
    was_training = model.training
    model.train()
    trained, val = split_validation(cache, config.val_fraction)
    trainer = parallel.on_every_rank(ctx, lambda: Trainer(model, trained, out, config, replay, val, ctx))
    latest = ctx.broadcast(checkpoints.latest_checkpoint(out) if resume and ctx.is_main else None)
    if latest is not None:
        trainer.restore(latest)
    main = ctx.is_main  # only rank 0 writes OUT and shows progress
    if resume and main:
        run_dir.repair_metrics(out, trainer.step)
    name = str(getattr(model.config, "_name_or_path", "") or "")
    prompt = prompt_record.prompt_of(cache)
    attn = attention_implementation_of(model)
    if main:
        trainer.on_first_step = lambda: run_dir.write_run(out, config, *identities, name, prompt, attn)
    started = time.perf_counter()
    progress = _progress_bar(trainer.total_steps, trainer.step, config.progress and main)
    writer = tensorboard_log.open_writer(out, config.tensorboard) if main else None
    try:
        rows = trainer.run(progress, writer)
    except KeyboardInterrupt:
        progress.close()
        # FSDP's checkpoint is collective: an interrupted job resumes from its last saved one.
        if trainer.step > 0 and not trainer.sharded:  # before the first step there is no run to continue
            path = trainer.checkpoint()
            if main:
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
    if trainer.sharded:
        fsdp.save_adapter(trainer.ctx, model, out / "adapter")
    elif trainer.ctx.is_main:
        save_adapter(model, out / "adapter")
    trainer.ctx.barrier()  # every rank returns once the adapter is written
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
