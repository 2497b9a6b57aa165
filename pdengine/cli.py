"""The `pdengine` command line.

    pdengine generate | answer | prefill | train | eval | demo   one stage (see --help of each)
    pdengine run --config F.yaml|.toml [--force [STAGE]]           the whole pipeline, resumable
    pdengine bench [NAME [ARGS...]]                                run bench/NAME.py

Stage modules are imported only when their command is used, so `pdengine --help` is fast
and a stage that fails to import breaks only its own command. Bad input (missing or empty
files, malformed JSONL, a directory that is not a causal LM, an unknown config key) is
reported as one line `pdengine CMD: error: ...` with exit code 2; set PDENGINE_DEBUG=1 to
get the traceback instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path

# command -> (module, add-arguments function, run function, one-line help)
STAGE_COMMANDS = {
    "generate": ("pdengine.qa", "add_generate_arguments", "run_generate",
                 "the model writes questions about each document"),
    "answer": ("pdengine.qa", "add_answer_arguments", "run_answer",
               "the teacher (document in its prompt) answers the questions"),
    "prefill": ("pdengine.prefill", "add_arguments", "run", "cache the teacher's top-k log-probs"),
    "train": ("pdengine.train", "add_arguments", "run", "train the LoRA student from the teacher cache"),
    "eval": ("pdengine.evaluate", "add_arguments", "run",
             "closed-book / open-book / RAG evaluation and report"),
    "demo": ("pdengine.demo", "add_arguments", "run",
             "the embedded end-to-end demo on a tiny local model"),
}
PIPELINE = ("generate", "answer", "prefill", "train", "eval")
TOP_LEVEL_KEYS = ("model", "documents", "out", "eval_questions", "device", "system", "stages")
ADAPTER_NAMES = {"pd": "prompt_distillation", "sft": "sft", "online_kl": "online_kl"}


class CommandError(Exception):
    """A failure already explained to the user; carries the exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _RaisingParser(argparse.ArgumentParser):
    """Argument parser that raises ValueError instead of printing usage and exiting
    (used to validate config-file sections)."""

    def error(self, message):
        raise ValueError(message)


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
        return int(args.handler(args) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, CommandError) as e:
        if os.environ.get("PDENGINE_DEBUG") == "1":
            raise
        print(f"pdengine {command}: error: {e}", file=sys.stderr)
        return e.code if isinstance(e, CommandError) else 2


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    from pdengine import __version__

    parser = argparse.ArgumentParser(
        prog="pdengine", description="Knowledge injection via prompt distillation (Kujanpää et al. 2024).")
    parser.add_argument("--version", action="version", version=f"pdengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_text) in STAGE_COMMANDS.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            add_arguments, run = _stage_functions(name)
            add_arguments(stage)
            stage.set_defaults(handler=run)
    _add_run_parser(sub)
    _add_bench_parser(sub)
    return parser


def _stage_functions(name: str):
    module_name, add_name, run_name = STAGE_COMMANDS[name][:3]
    try:
        module = import_module(module_name)
        return getattr(module, add_name), getattr(module, run_name)
    except (ImportError, AttributeError) as e:
        raise CommandError(f"this command is not available ({module_name}: {e})") from None


# ---------------------------------------------------------------- pdengine run


def _add_run_parser(sub) -> None:
    run = sub.add_parser(
        "run", help="the whole pipeline (generate -> answer -> prefill -> train -> eval) from a config file",
        description=_RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", required=True, help="YAML (.yaml/.yml) or TOML (.toml) file")
    run.add_argument("--force", nargs="?", const=PIPELINE[0], default=None, choices=PIPELINE, metavar="STAGE",
                     help="redo STAGE and every stage after it (no STAGE: redo everything)")
    run.set_defaults(handler=run_pipeline)


_RUN_DESCRIPTION = """\
Run the pipeline from one config file. Paths are relative to the current directory.

  model: path/to/hf-model          # required: local causal-LM directory
  documents: data/documents.jsonl  # required: {id, text}
  out: runs/my-run                 # required: questions.jsonl, qa.jsonl, cache/, train/, eval/
  eval_questions: data/eval.jsonl  # {doc_id, question, answer}; without it eval is skipped
  device: cuda                     # optional, every stage
  system: "You are ..."            # optional system prompt, every stage (keeps prompts identical)
  stages: [generate, answer, prefill, train, eval]   # optional subset
  generate: {n_questions: 30, per_call: 5}   # options of `pdengine generate` (- or _)
  answer: {n_answers: 1, temperature: 1.5}   # options of `pdengine answer`
  prefill: {k: 64}                           # options of `pdengine prefill`
  train: {epochs: 10, loss: pd}              # options of `pdengine train`
  eval: {methods: closed_book,open_book,rag} # options of `pdengine eval`

A stage that finished (its output plus a done marker in OUT/.pdengine/) with the same
settings and the same inputs is skipped; a changed setting reruns that stage and the
later ones; an interrupted prefill or training resumes. --force redoes (and, for train,
deletes OUT/train first).
"""


def _load_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            config = yaml.safe_load(text)
        elif path.suffix == ".toml":
            import tomllib

            config = tomllib.loads(text)
        else:
            raise ValueError(f"config file {path}: use .yaml, .yml or .toml")
    except ValueError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise ValueError(f"config file {path}: cannot parse: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config file {path}: expected a mapping of keys at the top")
    return config


def _check_top_level(config: dict) -> list[str]:
    valid = (*TOP_LEVEL_KEYS, *PIPELINE)
    unknown = sorted(k for k in config if k not in valid)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    missing = [k for k in ("model", "documents", "out") if not config.get(k)]
    if missing:
        raise ValueError(f"config: missing required key(s) {missing}")
    stages = config.get("stages") or list(PIPELINE)
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in PIPELINE]
    if bad:
        raise ValueError(f"config: stages {bad} unknown; valid stages: {', '.join(PIPELINE)}")
    for stage in PIPELINE:
        if config.get(stage) is not None and not isinstance(config[stage], dict):
            raise ValueError(f"config: [{stage}] must be a mapping of options")
    return [s for s in PIPELINE if s in stages]  # pipeline order


def _wiring(config: dict, stages: list[str]) -> dict:
    """What the pipeline itself passes to each stage (dest -> value): the files that link
    the stages. These keys cannot be set in a stage's section."""
    out = Path(config["out"])
    common = {"model": config["model"], "device": config.get("device"), "system": config.get("system")}
    train_cfg = config.get("train") or {}
    adapters = []
    if "train" in stages:
        name = ADAPTER_NAMES.get(str(train_cfg.get("loss", "pd")), str(train_cfg.get("loss")))
        adapters.append(f"{name}={out / 'train' / 'adapter'}")
    return {
        "generate": {**common, "documents": config["documents"], "out": out / "questions.jsonl"},
        "answer": {**common, "documents": config["documents"], "questions": out / "questions.jsonl",
                   "out": out / "qa.jsonl"},
        "prefill": {**common, "documents": config["documents"], "qa": out / "qa.jsonl", "out": out / "cache"},
        "train": {**common, "cache": out / "cache", "out": out / "train"},
        "eval": {**common, "documents": config["documents"], "questions": config.get("eval_questions"),
                 "out": out / "eval", "adapter": adapters},
    }


# what a finished stage leaves behind (relative to OUT)
STAGE_OUTPUT = {"generate": "questions.jsonl", "answer": "qa.jsonl", "prefill": "cache",
                "train": "train/adapter", "eval": "eval/report.json"}
# flags the pipeline controls itself
CONTROLLED = {"prefill": ("force",), "train": ("resume",)}


def _stage_argv(stage: str, parser, wired: dict, section: dict) -> list[str]:
    """Command-line tokens for one stage: the wiring, then the config section's options.
    Going through argparse (rather than setting attributes) gives config values the same
    type checks, choices and defaults as the command line."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    fixed = set(wired) | set(CONTROLLED.get(stage, ()))
    valid = sorted(d for d in actions if d not in fixed or d == "adapter")
    argv = []
    for dest, value in wired.items():
        if dest in actions:
            argv += _tokens(actions[dest], value)
    for key, value in section.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or (dest in fixed and dest != "adapter"):
            raise ValueError(f"config: [{stage}] has no key {key!r}; valid keys: {', '.join(valid)}")
        argv += _tokens(actions[dest], value)
    return argv


def _tokens(action, value) -> list[str]:
    flag = action.option_strings[-1]
    if value is None or value is False or value == []:
        return []
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return [flag] if value is True else _bad_flag(flag, value)
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [t for v in values for t in (flag, str(v))]
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return [flag, str(value)]


def _bad_flag(flag, value):
    raise ValueError(f"config: {flag.lstrip('-')} is a switch; use true or false, not {value!r}")


def _stage_parser(stage: str):
    add_arguments, run = _stage_functions(stage)
    parser = _RaisingParser(prog=f"[{stage}]", add_help=False)
    add_arguments(parser)
    return parser, run


def _fingerprint(stage: str, argv: list[str], upstream: str) -> str:
    blob = json.dumps({"stage": stage, "argv": argv, "upstream": upstream})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _marker(out: Path, stage: str) -> Path:
    return out / ".pdengine" / f"{stage}.done"


def _is_done(out: Path, stage: str, fingerprint: str) -> bool:
    marker = _marker(out, stage)
    if not marker.is_file() or not (out / STAGE_OUTPUT[stage]).exists():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except (json.JSONDecodeError, OSError):
        return False


def _say(message: str) -> None:
    print(f"[pdengine run] {message}", file=sys.stderr, flush=True)


def run_pipeline(args) -> int:
    """`pdengine run`: the stages in order; finished ones are skipped (see --help)."""
    from pdengine.io import atomic_write_json

    config = _load_config(args.config)
    stages = _check_top_level(config)
    if "eval" in stages and not config.get("eval_questions"):
        _say("eval: skipped (no eval_questions in the config)")
        stages.remove("eval")
    out = Path(config["out"])
    wiring = _wiring(config, stages)
    plans, upstream = [], ""
    for stage in stages:  # validate every section before running anything
        parser, run = _stage_parser(stage)
        argv = _stage_argv(stage, parser, wiring[stage], config.get(stage) or {})
        _parse_stage(stage, parser, argv)
        upstream = _fingerprint(stage, argv, upstream)
        plans.append((stage, parser, run, argv, upstream))
    redo = False
    for stage, parser, run, argv, fingerprint in plans:
        redo = redo or (args.force is not None and PIPELINE.index(stage) >= PIPELINE.index(args.force))
        if not redo and _is_done(out, stage, fingerprint):
            _say(f"{stage}: done already, skipped")
            continue
        fresh = redo or _marker(out, stage).is_file()  # a changed setting also starts afresh
        _run_stage(stage, parser, run, argv, out, fresh)
        atomic_write_json(_marker(out, stage), {"fingerprint": fingerprint, "argv": argv})
        redo = True  # everything after a stage that ran is redone
    _say(f"finished; outputs in {out}")
    return 0


def _parse_stage(stage, parser, argv):
    try:
        return parser.parse_args(argv)
    except ValueError as e:
        raise ValueError(f"config: [{stage}] {e}") from None


def _run_stage(stage, parser, run, argv, out: Path, fresh: bool) -> None:
    _marker(out, stage).unlink(missing_ok=True)  # an interrupted stage is never "done"
    if stage == "prefill" and fresh:
        argv = [*argv, "--force"]
    if stage == "train":
        if fresh and (out / "train").exists():
            shutil.rmtree(out / "train")  # the pipeline's own training directory
        argv = [*argv, "--resume"]  # continues an interrupted run; a fresh start otherwise
    _say(f"{stage}: running")
    try:
        code = run(_parse_stage(stage, parser, argv))
    except ValueError as e:
        raise ValueError(f"[{stage}] {e}") from None
    if code:
        raise CommandError(f"stage {stage} failed (exit code {code})", code=int(code))


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
        raise ValueError(f"unknown benchmark {args.name!r}; available: {', '.join(names) or 'none'}")
    script = bench_dir() / f"{args.name}.py"
    return subprocess.call([sys.executable, str(script), *args.bench_args])
