"""The `pdengine` command line.

    pdengine chunk | generate | answer | prefill | train | eval | demo   one stage (see --help of each)
    pdengine export --merge | curves                                merge an adapter; plot a training run
    pdengine run --config F.yaml|.toml [--force [STAGE]]           the whole pipeline, resumable
    pdengine bench [NAME [ARGS...]]                                run bench/NAME.py

Stage modules are imported only when their command is used, so `pdengine --help` is fast
and a stage that fails to import breaks only its own command.

One error contract for every command: bad input (an `InputError`: missing or empty files,
malformed JSONL, a directory that is not a causal LM, an unknown config key, a value out of
range) is one line `pdengine CMD: error: ...` on stderr and exit code 2; a `CommandError`
(a failure already explained, e.g. a stage's exit code) is one line and its own code.
PDENGINE_DEBUG=1 shows their traceback instead. Any other exception is a bug in pdengine
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

from pdengine.errors import CommandError, InputError

# command -> (module, add-arguments function, run function, one-line help)
STAGE_COMMANDS = {
    "chunk": ("pdengine.chunking", "add_arguments", "run",
              "split documents longer than --chunk-tokens into chunks ID#0, ID#1, ..."),
    "generate": ("pdengine.qa", "add_generate_arguments", "run_generate",
                 "the model writes questions about each document"),
    "answer": ("pdengine.qa", "add_answer_arguments", "run_answer",
               "the teacher (document in its prompt) answers the questions"),
    "prefill": ("pdengine.prefill", "add_arguments", "run", "cache the teacher's top-k log-probs"),
    "train": ("pdengine.train", "add_arguments", "run", "train the LoRA student from the teacher cache"),
    "eval": ("pdengine.evaluate", "add_arguments", "run",
             "closed-book / open-book / RAG evaluation and report"),
    "export": ("pdengine.export", "add_arguments", "run",
               "write the base model with an adapter merged into it as one full model (--merge)"),
    "curves": ("pdengine.curves", "add_arguments", "run", "draw a training run's curves (training_curves.png)"),
    "demo": ("pdengine.demo", "add_arguments", "run",
             "the embedded end-to-end demo on a tiny local model"),
}


# ---------------------------------------------------------------- entry point


def main(argv=None) -> int:
    """Run `pdengine` with `argv` (default: sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        parser = _build_parser(command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        code = int(args.handler(args) or 0)
        _leave_process_group(finished=code == 0)
        return code
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (InputError, CommandError) as e:  # only these: any other exception is a bug
        if os.environ.get("PDENGINE_DEBUG") == "1":
            raise
        if getattr(e, "shown", True):  # distributed.PeerFailed: another rank failed; rank 0 says so
            # one write, line and newline together: under torchrun several ranks share stderr
            sys.stderr.write(f"pdengine {command}: error: {e}\n")
            sys.stderr.flush()
        return e.code if isinstance(e, CommandError) else 2
    finally:
        _leave_process_group()


def _leave_process_group(finished: bool = False) -> None:
    """Under torchrun a command that joined the process group leaves it at the end (the
    module is only loaded, and torch.distributed only touched, when a stage used it);
    `finished`: without error on this rank, so it waits for the others first."""
    module = sys.modules.get("pdengine.distributed")
    if module is not None:
        module.shutdown(finished)


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    from pdengine import __version__

    parser = argparse.ArgumentParser(
        prog="pdengine", description="Knowledge injection via prompt distillation (Kujanpää et al. 2024).")
    parser.add_argument("--version", action="version", version=f"pdengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_text) in STAGE_COMMANDS.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            add_arguments, run = stage_functions(name)
            add_arguments(stage)
            stage.set_defaults(handler=run)
    _add_run_parser(sub)
    _add_bench_parser(sub)
    return parser


def stage_functions(name: str):
    """(add_arguments, run) of a stage command; CommandError when its module is missing."""
    module_name, add_name, run_name = STAGE_COMMANDS[name][:3]
    try:
        module = import_module(module_name)
        return getattr(module, add_name), getattr(module, run_name)
    except (ImportError, AttributeError) as e:
        raise CommandError(f"this command is not available ({module_name}: {e})") from None


# ---------------------------------------------------------------- pdengine run


def _add_run_parser(sub) -> None:
    from pdengine.pipeline import PIPELINE

    run = sub.add_parser(
        "run", help="the whole pipeline (chunk -> generate -> answer -> prefill -> replay -> train -> eval) "
               "from a config file",
        description=_RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", required=True, help="YAML (.yaml/.yml) or TOML (.toml) file")
    run.add_argument("--force", nargs="?", const=PIPELINE[0], default=None, choices=PIPELINE, metavar="STAGE",
                     help="redo STAGE and every stage after it (no STAGE: redo everything)")
    run.set_defaults(handler=_run_pipeline)


def _run_pipeline(args) -> int:
    from pdengine.pipeline import run_pipeline

    return run_pipeline(args)


_RUN_DESCRIPTION = """\
Run the pipeline from one config file. Paths are relative to the current directory.

  model: path/to/hf-model          # required: local causal-LM directory
  documents: data/documents.jsonl  # required: {id, text}
  out: runs/my-run                 # required: questions.jsonl, qa.jsonl, cache/, train/, eval/
  eval_questions: data/eval.jsonl  # {doc_id, question, answer}; without it eval is skipped
  device: cuda                     # optional, every stage
  attn_implementation: auto        # optional, every stage: auto, sdpa, eager, flash_attention_2, flex_attention
  quantize: none                   # optional, every stage: none, nf4, int8 (a bitsandbytes base)
  system: "You are ..."            # optional system prompt, every stage (keeps prompts identical)
  stages: [generate, answer, prefill, train, eval]   # optional subset
  chunk: {chunk_tokens: 1024, overlap_tokens: 64}  # optional: split longer documents first
  generate: {n_questions: 30, per_call: 5}   # settings of `pdengine generate` (- or _)
  answer: {n_answers: 1, temperature: 1.5}   # settings of `pdengine answer`
  prefill: {k: 64}                           # settings of `pdengine prefill`
  replay: {k: 64}                            # the replay cache's prefill (default: prefill's settings)
  train: {epochs: 10, loss: pd}              # settings of `pdengine train`
  eval: {methods: [closed_book, open_book, rag]}   # settings of `pdengine eval`

The stages run in the order chunk, generate, answer, prefill, replay, train, eval.
chunk runs only with a chunk section (documents longer than chunk_tokens become ID#0,
ID#1, ... in OUT/documents.jsonl, which every later stage reads); replay runs only when
train.replay_fraction > 0: a second prefill of the same QA pairs with the document in the
student's prompt, into OUT/replay_cache, mixed into training.

Every section is checked before the first stage starts. A stage that finished (its
output plus a done marker in OUT/.pdengine/) with the same settings and the same input
CONTENTS (the model directory, documents and eval questions are hashed; each file once
until its size or mtime changes) is skipped; a changed setting or an edited input reruns
that stage and the later ones; an interrupted prefill, replay or training resumes. --force
redoes (and, for train, deletes OUT/train first). One `pdengine run` at a time writes OUT.
"""


# ---------------------------------------------------------------- pdengine bench


def bench_dir() -> Path:
    """The repository's bench/ folder (next to the pdengine package in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "bench"


def available_benches() -> list[str]:
    folder = bench_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.py") if p.stem != "common" and not p.stem.startswith("_"))


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark script bench/NAME.py",
                           description="Run bench/NAME.py with ARGS; without NAME, list the benchmarks.")
    bench.add_argument("name", nargs="?", help="benchmark name (bench/NAME.py)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script")
    bench.set_defaults(handler=run_bench)


def run_bench(args) -> int:
    """`pdengine bench [NAME [ARGS...]]`."""
    names = available_benches()
    if not args.name:
        print("available benchmarks: " + (", ".join(names) if names else f"none (no scripts in {bench_dir()})"))
        return 0
    if args.name not in names:
        raise InputError(f"unknown benchmark {args.name!r}; available: {', '.join(names) or 'none'}")
    script = bench_dir() / f"{args.name}.py"
    return subprocess.call([sys.executable, str(script), *args.bench_args])
