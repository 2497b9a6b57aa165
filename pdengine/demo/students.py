"""The demo's students: one LoRA training per (loss, training seed), PD and SFT.

The runs are independent (same base, same caches, their own seed), so `cfg.workers` of
them run at a time, each in a worker process with `cfg.threads` torch threads: on the
2-core CPU two one-thread processes train about twice as fast as one process (the tiny
model gains little from a second thread inside one run). Every run writes its adapter;
the parent then loads each adapter onto a fresh base, bit for bit the model the worker
trained (the adapter is saved in fp32). `cfg.workers == 1` trains in this process, one
run after the other, and keeps the trained models.

A run's result does not depend on where it ran: its LoRA init, batch order and replay
draws come from its training seed only (pdengine.training), and tests/test_demo.py checks
that a worker's adapter equals an in-process one byte for byte.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from pdengine.errors import CommandError

LOSSES = (("pd", "prompt_distillation"), ("sft", "sft"))  # (train loss, method name in the report)


def load_base(model_dir: Path, quantize: str = "none"):
    """The demo's base model (fp32 on the CPU, quantized when asked): the teacher, and the
    base of every student, so teacher and students share one (quantized) function."""
    from pdengine.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir, dtype=torch.float32, device="cpu", quantize=quantize)


def train_student(model_dir: Path, cache, replay, out_dir: Path, loss: str, cfg, seed: int, progress=None):
    """A fresh copy of the base model + LoRA (attention, MLP and input embeddings), trained
    with training seed `seed` (LoRA init, batch order, replay draws)."""
    from pdengine.train import TrainConfig, train

    model, tokenizer = load_base(model_dir, cfg.quantize)
    config = TrainConfig(
        loss=loss, temperature=cfg.distill_temperature, lr=cfg.lr, weight_decay=0.0, warmup_ratio=0.05,
        lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, lora_embeddings=True,
        batch_tokens=cfg.batch_tokens, seed=seed, max_steps=cfg.steps, schedule_steps=cfg.steps,
        epochs=10_000, save_every=0, keep_checkpoints=1, replay_fraction=cfg.replay_fraction,
        progress=cfg.progress if progress is None else progress,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    run_summary = train(model, tokenizer, cache, out_dir, config, replay_cache=replay)
    return model.eval(), run_summary


def training_seeds(cfg) -> list[int]:
    return [cfg.seed + i for i in range(cfg.seeds)]


def run_dir(out: Path, loss: str, seed: int) -> Path:
    return out / loss / f"seed-{seed}"


def jobs(cfg) -> list[tuple[str, int]]:
    """(loss, training seed) of every run, by seed, PD before SFT."""
    return [(loss, seed) for seed in training_seeds(cfg) for loss, _ in LOSSES]


def train_all(stages, out: Path, cache, replay, cfg) -> tuple[dict, dict]:
    """Every run as one stage, "train"; each run's own wall and CPU time is recorded as
    `train_<loss>_seed<S>`. Returns ({method: [model per seed]}, {loss: [summary per seed]});
    the models stay in memory for evaluation and the reading check."""
    todo = jobs(cfg)
    where = f"{min(cfg.workers, len(todo))} processes" if cfg.workers > 1 else "this process"
    results = stages.run("train", _train_jobs, stages, todo, out, cache, replay, cfg,
                         note=f"{len(todo)} runs (PD, SFT x {cfg.seeds} seeds) in {where}, "
                              f"{cfg.threads} thread(s) each")
    models, summaries = {name: [] for _, name in LOSSES}, {loss: [] for loss, _ in LOSSES}
    names = dict(LOSSES)
    for (loss, seed), (model, summary) in zip(todo, results):
        models[names[loss]].append(model)
        summaries[loss].append(_brief(summary, seed))
    return models, summaries


def _train_jobs(stages, todo, out, cache, replay, cfg) -> list:
    """[(model, run summary)] in the order of `todo`."""
    if cfg.workers == 1:
        return [_timed(stages, loss, seed, train_student, out / "model", cache, replay,
                       run_dir(out, loss, seed), loss, cfg, seed) for loss, seed in todo]
    summaries = _train_in_workers(stages, todo, out, cache, replay, cfg)
    return [(_load_student(out, loss, seed, cfg), summaries[(loss, seed)]) for loss, seed in todo]


def _timed(stages, loss, seed, fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    model, summary = fn(*args)
    stages.record(f"train_{loss}_seed{seed}", time.perf_counter() - wall, time.process_time() - cpu)
    return model, summary


# What a worker trains on, set by `_init_worker` in each worker; a task is only (loss, seed).
_CONTEXT: dict = {}


def start_method(threads: int) -> str:
    """fork when the workers run one thread: they inherit the loaded modules (nothing is
    re-imported or pickled). A parent that ran several OpenMP threads cannot fork safely
    (GNU OpenMP's thread pool does not survive a fork: the child hangs in its first
    parallel region, seen with --threads 2), so it spawns fresh processes instead."""
    return "fork" if threads == 1 else "spawn"


def _train_in_workers(stages, todo, out, cache, replay, cfg) -> dict:
    """{(loss, seed): run summary}, training `cfg.workers` runs at a time in worker processes."""
    method = start_method(cfg.threads)
    if method == "fork":
        _import_before_fork()
    context = multiprocessing.get_context(method)
    summaries = {}
    # each worker opens the caches from their directories (a spawned one cannot inherit them)
    init = (out, str(cache.path), str(replay.path), cfg)
    # an executor, not a multiprocessing.Pool: a worker killed (OOM, SIGKILL) breaks the
    # executor with an error, where a Pool would wait for its result forever
    pool = ProcessPoolExecutor(min(cfg.workers, len(todo)), mp_context=context, initializer=_init_worker,
                               initargs=init)
    try:
        for done in as_completed([pool.submit(_worker_run, task) for task in todo]):
            loss, seed, summary, wall, cpu, pid = done.result()
            summaries[(loss, seed)] = summary
            stages.record(f"train_{loss}_seed{seed}", wall, cpu, note=f"process {pid}")
    except BrokenProcessPool:
        raise CommandError("a training worker died (killed, or out of memory?); rerun with --workers 1 "
                           "to train in the demo's own process") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # reaped: the stage's CPU time counts them
    return summaries


def _init_worker(out, cache_path, replay_path, cfg) -> None:
    from pdengine.cache import TeacherCache

    torch.set_num_threads(cfg.threads)
    _import_before_fork()  # a spawned worker: silence bitsandbytes' import warning here too
    _CONTEXT.update(out=out, cache=TeacherCache(cache_path), replay=TeacherCache(replay_path), cfg=cfg)


def _import_before_fork() -> None:
    """What every run imports, imported once here so the workers inherit it: the trainer,
    and peft (train() asks whether the model is a PEFT model), which imports bitsandbytes,
    whose import warns once per process unless quantize.import_bitsandbytes silences it."""
    import pdengine.train  # noqa: F401
    from pdengine.errors import InputError
    from pdengine.quantize import import_bitsandbytes

    try:
        import_bitsandbytes()
        import peft  # noqa: F401
    except (InputError, ImportError):  # neither is needed by an unquantized run
        pass


def _worker_run(job):
    loss, seed = job
    c = _CONTEXT
    wall, cpu = time.perf_counter(), time.process_time()
    # no progress bars: two processes would draw over each other; the parent logs each run
    _, summary = train_student(c["out"] / "model", c["cache"], c["replay"], run_dir(c["out"], loss, seed), loss,
                               c["cfg"], seed, progress=False)
    return loss, seed, summary, time.perf_counter() - wall, time.process_time() - cpu, os.getpid()


def _load_student(out: Path, loss: str, seed: int, cfg):
    """The base (quantized as trained) with the run's saved adapter, in eval mode."""
    from pdengine.lora import load_adapter

    model, _ = load_base(out / "model", cfg.quantize)
    return load_adapter(model, run_dir(out, loss, seed) / "adapter").eval()


def _brief(run_summary: dict, seed: int) -> dict:
    return {"seed": seed, **{k: run_summary.get(k) for k in ("steps", "first_loss", "final_loss", "seconds",
                                                         "tokens_per_s")}}
