"""torchrun overhead on CPU: the same prefill and training, 1 rank x 2 threads vs 2 ranks x 1 thread.

Issue 12 asks to show that the distributed machinery (process group, round-robin units, the
gather on rank 0, the LoRA-gradient all-reduce) adds little. On a 2-core CPU the two layouts use
the same two cores, so their ratio is the cost (or gain) of splitting the work by rank rather
than by thread; 1 rank x 1 thread is the serial reference both are compared with (on a shared,
loaded machine two threads of one process can be slower than one, which that row exposes).
GPU scaling (N GPUs) needs a multi-GPU machine: `--preset gpu` is its workload.

Each measurement is a fresh launch (`python bench/distributed.py --worker ...`, under
`python -m torch.distributed.run --nproc_per_node 2` for two ranks); the worker builds the model
and data, runs the stage `--reps` times and prints the median of its own wall time (between two
barriers, so start-up and model building are not counted). Launches alternate between the
layouts (round-robin), so a slow stretch of the shared machine hits all of them alike.

Workload (`--preset cpu`): a random-initialised Llama (d=256, 4 layers, V=32000), 8 documents of
256 tokens with 12 QA pairs each (16-token questions, 31-token answers); prefill at k=64; training
8 PD steps of 2048 tokens on that cache.

Usage: python bench/distributed.py [--preset cpu|gpu] [--rounds 3] [--reps 2] [--stages prefill,train]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_save_flag, environment, print_table, save_results
from prefill import ANSWER_TOKENS, QUESTION_TOKENS, VOCAB, small_llama, word_tokenizer

PRESETS = {  # documents, tokens per document, QA pairs per document, train steps, batch tokens
    "cpu": dict(documents=8, doc_tokens=256, qa_per_doc=12, steps=8, batch_tokens=2048),
    "gpu": dict(documents=64, doc_tokens=2048, qa_per_doc=32, steps=50, batch_tokens=16384),
}


def corpus(documents: int, doc_tokens: int, qa_per_doc: int, seed: int = 0):
    """Random-word documents and QA pairs (the teacher answers are fixed token ids)."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 5, (n,), generator=g).tolist())

    docs = [{"id": f"d{i}", "text": words(doc_tokens)} for i in range(documents)]
    qa = [{"doc_id": d["id"], "question": words(QUESTION_TOKENS),
           "answer_ids": torch.randint(5, VOCAB, (ANSWER_TOKENS,), generator=g).tolist()}
          for d in docs for _ in range(qa_per_doc)]
    return docs, qa


# ---------------------------------------------------------------- worker (one launch)

def _timed(ctx, fn) -> float:
    ctx.barrier()
    start = time.perf_counter()
    fn()
    ctx.barrier()
    return time.perf_counter() - start


def worker(stage: str, preset: dict, reps: int, workdir: Path, index: int) -> dict | None:
    from pdengine import distributed
    from pdengine.prefill import prefill

    ctx = distributed.context()
    tok, model = word_tokenizer(VOCAB), small_llama()
    docs, qa = corpus(preset["documents"], preset["doc_tokens"], preset["qa_per_doc"])
    seconds = []
    if stage == "prefill":
        for rep in range(-1, reps):  # rep -1: warm-up (lazy initialisation), not counted
            out = workdir / f"launch-{index}" / f"cache-{rep}"
            seconds.append(_timed(ctx, lambda: prefill(model, tok, docs, qa, out, k=64, resume=False,
                                                       progress=False, shard_size=preset["qa_per_doc"])))
    else:
        from pdengine.cache import TeacherCache
        from pdengine.train import TrainConfig, train

        cache = TeacherCache(workdir / "train-cache")
        config = TrainConfig(max_steps=preset["steps"], batch_tokens=preset["batch_tokens"], lr=1e-4,
                             lora_dropout=0.0, progress=False, save_every=0)
        for rep in range(-1, reps):
            out = workdir / f"launch-{index}" / f"train-{rep}"
            seconds.append(_timed(ctx, lambda: train(model, tok, cache, out, config)))
            model = small_llama()  # train() added LoRA; the next rep starts from the plain base
    distributed.shutdown()
    if not ctx.is_main:
        return None
    return {"stage": stage, "ranks": ctx.world_size, "threads_per_rank": torch.get_num_threads(),
            "median_s": statistics.median(seconds[1:]), "reps": reps}


# ---------------------------------------------------------------- launcher

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: str, ranks: int, threads: int, args, workdir: Path, index: int) -> dict:
    """One fresh launch: `ranks` processes with `threads` threads each, writing into its own
    folder (the training cache is shared, read-only)."""
    script = [__file__, "--worker", stage, "--preset", args.preset, "--reps", str(args.reps),
              "--workdir", str(workdir), "--launch", str(index)]
    cmd = [sys.executable, *script] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_train_cache(args, workdir: Path) -> None:
    from pdengine.prefill import prefill

    preset = PRESETS[args.preset]
    docs, qa = corpus(preset["documents"], preset["doc_tokens"], preset["qa_per_doc"])
    prefill(small_llama(), word_tokenizer(VOCAB), docs, qa, workdir / "train-cache", k=64, progress=False)


def summarize(rows: list[dict]) -> list[dict]:
    """Per stage and layout: the median over launches, and its time over 1 rank x 1 thread's."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        layouts = {}
        for r in rows:
            if r["stage"] == stage:
                layouts.setdefault((r["ranks"], r["threads_per_rank"]), []).append(r["median_s"])
        serial = statistics.median(layouts[(1, 1)])
        for (ranks, threads), times in layouts.items():
            out.append({"stage": stage, "layout": f"{ranks} rank x {threads} thread",
                        "median_s": statistics.median(times), "launches": len(times),
                        "speedup_vs_1x1": serial / statistics.median(times)})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--stages", default="prefill,train")
    parser.add_argument("--rounds", type=int, default=3, help="launches per layout (alternating)")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions inside a launch")
    parser.add_argument("--cores", type=int, default=2, help="cores to use: N ranks x 1 thread against "
                        "1 rank x N threads (and 1 x 1, the serial reference)")
    parser.add_argument("--worker", choices=("prefill", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--launch", type=int, default=0, help=argparse.SUPPRESS)
    add_save_flag(parser)
    args = parser.parse_args()
    if args.worker:
        row = worker(args.worker, PRESETS[args.preset], args.reps, Path(args.workdir), args.launch)
        if row is not None:
            print(json.dumps(row))
        return
    print(environment())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        stages = args.stages.split(",")
        if "train" in stages:
            prepare_train_cache(args, workdir)
        for _ in range(args.rounds):
            for stage in stages:
                for ranks, threads in ((1, 1), (1, args.cores), (args.cores, 1)):
                    rows.append(launch(stage, ranks, threads, args, workdir, len(rows)))
                    print(rows[-1], flush=True)
    table = summarize(rows)
    print_table(table, ["stage", "layout", "median_s", "launches", "speedup_vs_1x1"])
    print("saved", save_results("distributed", table, args.save))


if __name__ == "__main__":
    main()
