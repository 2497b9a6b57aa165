"""`train(model, tokenizer, cache, out_dir, config)`: one run from its checks to its adapter.

The setup around the `Trainer` (docs/DESIGN.md, "Training" and "Distributed"): OUT's lock
(rank 0), the run's settings (run.json on a resume), the data checks, restoring the latest
checkpoint, the progress bar and TensorBoard, and the final checkpoint and adapter. Under
torchrun every setup step that can fail with bad input ends on every rank together
(`distributed.on_every_rank`), so no rank waits in a collective another never joins.
"""
from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

from pdengine import distributed
from pdengine.errors import InputError
from pdengine.loading import attention_implementation_of
from pdengine.locking import DirectoryLock
from pdengine.training import checkpoints, fsdp, parallel, prompt_record, run_dir, tensorboard_log
from pdengine.training.config import TrainConfig
from pdengine.training.loop import Trainer
from pdengine.training.sources import as_source, split_validation


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
    With `config.fsdp` the model stays sharded (FSDP2) afterwards: use the saved adapter on a
    freshly loaded base.
    """
    out, ctx = Path(out_dir), distributed.context()
    with ExitStack() as stack:  # rank 0 holds OUT's lock for the whole run (under torchrun: for the job)
        config, run = distributed.on_every_rank(ctx, lambda: _open_run(stack, ctx, out, config, resume))
        config = ctx.broadcast(config)  # run.json is read by rank 0 only: other nodes need not see OUT
        cache, replay, identities = distributed.on_every_rank(
            ctx, lambda: _check_run(ctx, model, tokenizer, cache, replay_cache, out, config, run, resume))
        return _train_locked(model, cache, replay, out, config, resume, identities, ctx)


def check_launch(ctx, config: TrainConfig) -> None:
    if config.fsdp and not ctx.distributed:
        raise InputError("fsdp shards the model across the processes of a torchrun job: launch with "
                         "torchrun --nproc_per_node N (N > 1), or train without --fsdp")


def _open_run(stack: ExitStack, ctx, out: Path, config, resume: bool):
    """Rank 0: take OUT's lock, read the run's settings. Other ranks: (None, None)."""
    if not ctx.is_main:
        return None, None
    stack.enter_context(DirectoryLock(out, purpose="pdengine train"))
    return _resolve_config(out, config, resume)


def _check_run(ctx, model, tokenizer, cache, replay_cache, out: Path, config: TrainConfig, run, resume: bool):
    """Every rank checks its data against its model; rank 0 checks OUT (a resume keeps the run)."""
    check_launch(ctx, config)
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
    trainer = Trainer(model, trained, out, config, replay, val, ctx)  # its checks end every rank alike
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
