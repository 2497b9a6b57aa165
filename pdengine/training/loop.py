"""The training loop: the `Trainer` that `train()` (`pdengine.training.session`) drives
(docs/DESIGN.md, "Training").

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
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from pdengine import distributed, modeling
from pdengine.errors import InputError
from pdengine.training import checkpoints, fsdp, parallel, run_dir, tensorboard_log
from pdengine.training.batching import mix_seed, pack_teacher
from pdengine.training.config import TrainConfig
from pdengine.training.losses import compute_loss, to_device
from pdengine.training.model_setup import prepare_model
from pdengine.training.sources import DataSource, Stream


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
        # A bad init_adapter path (seen by one node only, say) must stop every rank before the
        # collectives below.
        self.params = distributed.on_every_rank(self.ctx, lambda: prepare_model(model, config))
        parallel.broadcast_parameters(self.ctx, self.params.values())  # before FSDP shards them
        self.sharded = config.fsdp  # train() checks that it runs under torchrun
        if self.sharded:
            fsdp.shard_model(model, self.ctx, config.fsdp_bf16)
            self.params = fsdp.trainable(model)
        self.device = modeling.output_layer(model).weight.device  # after FSDP placed the model
        self.autocast = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
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
            loaded = distributed.on_every_rank(
                self.ctx, lambda: checkpoints.read_checkpoint(path) if self.ctx.is_main else None)
            tensors, state = self.ctx.broadcast(loaded)
            checkpoints.apply_checkpoint(path, tensors, state, self.params, self.optimizer, self.scheduler)
        # another number of ranks splits the batches otherwise: the same result up to float
        # order, dropout masks included (`lora.dropout_row_offset`), so it may differ
        self.step = int(state["step"])
        self.main = self.main.at(state["position"]["main"])
        if self.replay is not None and "replay" in state["position"]:
            self.replay = self.replay.at(state["position"]["replay"])
        self.committed = self._position()

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

    def _share_step(self, batch, source: DataSource, weight: float) -> torch.Tensor:
        """Forward + backward of this rank's share of `batch`: its sequences' mean loss times
        their share of the answer tokens (and `weight`), so the ranks' parts sum to the
        one-process loss (`pdengine.training.parallel`). Forward and backward run under the
        share's dropout row offset (a recomputing backward, with grad_checkpointing, needs it
        too), hence one backward per batch. Returns the detached part."""
        from pdengine.lora import dropout_row_offset

        local, n_local, n_total = parallel.split_batch(batch, self.ctx.rank, self.ctx.world_size)
        with dropout_row_offset(local["token_offset"]):
            loss = self._loss(local, source) * (weight * n_local / n_total)
            (loss / self.config.grad_accum).backward()
        return loss.detach()

    def _distributed_micro_step(self, batch) -> torch.Tensor:
        f = self.config.replay_fraction
        loss = self._share_step(batch, self.cache, 1.0 if self.replay is None else 1 - f)
        if self.replay is not None:
            replay = self.replay.next()
            loss = loss + self._share_step(replay, self.replay.source, f)
            self.tokens += replay["input_ids"].numel()
        self.tokens += batch["input_ids"].numel()
        return loss

    def micro_step(self, batch) -> torch.Tensor:
        """Forward + backward of one micro-batch (plus its replay share); the detached loss
        (this rank's part under torchrun; `optimizer_step` sums the parts)."""
        if self.ctx.distributed:
            return self._distributed_micro_step(batch)
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
