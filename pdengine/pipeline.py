"""`pdengine run`: the whole pipeline (chunk -> generate -> answer -> prefill -> replay ->
train -> eval) from one config file, resumable.

Two stages are optional: `chunk` runs when the config has a `chunk:` section (long
documents split, pdengine/chunking.py; every later stage reads OUT/documents.jsonl), and
`replay` (a second prefill of the same QA pairs with the document in the student's prompt,
into OUT/replay_cache, given to train as its replay cache) runs when
`train.replay_fraction > 0`. The top-level `device`, `attn_implementation` and `quantize`
go to every stage that loads a model.

Every stage's section is checked before the first stage starts: each stage names its
settings dataclass (`STAGE_CONFIGS`), and `pdengine.config.from_mapping` builds it from the
section, so a bad value anywhere (`train: {lr: .nan}`) stops the run before generate.

A finished stage leaves a done marker `OUT/.pdengine/STAGE.done` with its fingerprint: the
stage's settings, the paths that wire it to its neighbours, the CONTENTS of its external
input files (the model directory, the documents, ...: see `pdengine.input_hashes`) and the
fingerprint of the stage before it. A stage is skipped only when its fingerprint is
unchanged, so an edited document reruns every stage that read it and every later one.
One `pdengine run` at a time writes OUT (a `DirectoryLock`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

from pdengine import config as C
from pdengine import distributed
from pdengine.errors import CommandError, InputError

PIPELINE = ("chunk", "generate", "answer", "prefill", "replay", "train", "eval")
TOP_LEVEL_KEYS = ("model", "documents", "out", "eval_questions", "device", "attn_implementation", "quantize",
                  "system", "stages")
# How every model-loading stage loads its model (pdengine.loading.add_model_arguments):
# top-level key -> the value meaning "nothing asked" (a stage whose command lacks the flag
# may then run without it; asking for more is refused rather than silently dropped).
MODEL_OPTIONS = {"device": None, "attn_implementation": "auto", "quantize": "none"}
OPTIONAL_STAGES = ("chunk", "replay")  # run only when configured (see the module docstring)
ADAPTER_NAMES = {"pd": "prompt_distillation", "sft": "sft", "online_kl": "online_kl"}
# stage -> (module, its settings dataclass)
STAGE_CONFIGS = {
    "chunk": ("pdengine.chunking", "ChunkConfig"),
    "generate": ("pdengine.qa", "GenerateConfig"),
    "answer": ("pdengine.qa", "AnswerConfig"),
    "prefill": ("pdengine.prefill", "PrefillConfig"),
    "replay": ("pdengine.prefill", "PrefillConfig"),
    "train": ("pdengine.train", "TrainConfig"),
    "eval": ("pdengine.evaluate", "EvalConfig"),
}
COMMANDS = {"replay": "prefill"}  # a stage run by another stage's command
# Section keys that are options of the stage's command but not settings (paths): name -> list?
EXTRA_KEYS = {"train": {"replay_cache": False}, "eval": {"adapter": True}}
# Options the pipeline sets itself (on the stage's namespace); a section cannot set them.
CONTROLLED = {"generate": ("force",), "answer": ("force",), "prefill": ("force",), "replay": ("force",),
              "train": ("resume",)}
RESUMABLE = ("prefill", "replay")  # an interrupted cache is continued, not overwritten
# What a finished stage leaves behind (relative to OUT).
STAGE_OUTPUT = {"chunk": "documents.jsonl", "generate": "questions.jsonl", "answer": "qa.jsonl", "prefill": "cache",
                "replay": "replay_cache", "train": "train/adapter", "eval": "eval/report.json"}
# Options whose values name input files or directories (their contents are fingerprinted).
PATH_OPTIONS = ("model", "documents", "questions", "qa", "cache", "replay_cache", "judge_model")


@dataclass
class StagePlan:
    """One stage, checked and ready: its settings, the namespace its `run(args)` gets,
    and the external inputs its fingerprint covers."""

    name: str
    settings: object
    namespace: argparse.Namespace
    run: object
    inputs: list[str] = field(default_factory=list)
    fingerprint: str = ""


def _say(ctx, message: str) -> None:
    if ctx.is_main:  # under torchrun the job says it once
        print(f"[pdengine run] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the config file


def load_config(path) -> dict:
    """The config file as a dict (YAML or TOML); InputError when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} not found")
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise InputError(f"config file {path}: use .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib

            config = tomllib.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as e:  # UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError
        raise InputError(f"config file {path}: cannot parse: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise InputError(f"config file {path}: expected a mapping of keys at the top")
    return config


def check_top_level(config: dict) -> list[str]:
    """The stages to run, in pipeline order; InputError for unknown or missing keys."""
    valid = (*TOP_LEVEL_KEYS, *PIPELINE)
    unknown = sorted(str(k) for k in config if k not in valid)
    if unknown:
        raise InputError(f"config: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    missing = [k for k in ("model", "documents", "out") if not config.get(k)]
    if missing:
        raise InputError(f"config: missing required key(s) {missing}")
    for key in ("model", "documents", "out", "eval_questions", *MODEL_OPTIONS, "system"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise InputError(f"config: {key} must be a string, got {config[key]!r}")
    _check_model_options(config)
    stages = config.get("stages") or [s for s in PIPELINE if s not in OPTIONAL_STAGES or s in config
                                      or (s == "replay" and replay_wanted(config))]
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in PIPELINE]
    if bad:
        raise InputError(f"config: stages {bad} unknown; valid stages: {', '.join(PIPELINE)}")
    for stage in PIPELINE:
        if config.get(stage) is not None and not isinstance(config[stage], dict):
            raise InputError(f"config: [{stage}] must be a mapping of options")
    return [s for s in PIPELINE if s in stages]


def _check_model_options(config: dict) -> None:
    from pdengine.attention import CHOICES
    from pdengine.quantize import QUANTIZE_CHOICES

    for key, choices in (("attn_implementation", CHOICES), ("quantize", QUANTIZE_CHOICES)):
        if config.get(key) is not None and config[key] not in choices:
            raise InputError(f"config: {key} must be one of {', '.join(choices)}; got {config[key]!r}")


def replay_wanted(config: dict) -> bool:
    """The replay stage has work to do: train mixes in a replay cache that the config does
    not name itself (`train.replay_cache`)."""
    train = config.get("train") or {}
    fraction = train.get("replay_fraction", train.get("replay-fraction", 0)) or 0
    named = train.get("replay_cache", train.get("replay-cache"))
    if isinstance(fraction, bool):
        return False  # the train section's own check refuses it
    try:
        fraction = float(fraction)  # as the train section's own check reads it ("0.5" included)
    except (TypeError, ValueError):
        return False  # that check names the bad value
    return fraction > 0 and not named


def active_stages(config: dict, stages: list[str]) -> list[str]:
    """`stages` less the replay stage when it has nothing to do (said once on stderr)."""
    if "replay" in stages and not replay_wanted(config):
        _say(distributed.context(), "replay: skipped (train.replay_fraction is 0, or train names its own replay_cache)")
        return [s for s in stages if s != "replay"]
    return stages


def wiring(config: dict, stages: list[str]) -> dict[str, dict]:
    """What the pipeline passes to each stage (option -> value): the files that link the
    stages, the model, how to load it, and the system prompt. A section cannot set these."""
    out = Path(config["out"])
    common = {"model": config["model"], **{key: config.get(key) for key in MODEL_OPTIONS}}
    documents = out / STAGE_OUTPUT["chunk"] if "chunk" in stages else config["documents"]
    prompts = {**common, "system": config.get("system"), "documents": documents}
    adapters = []
    if "train" in stages:
        loss = str((config.get("train") or {}).get("loss", "pd"))
        adapters.append(f"{ADAPTER_NAMES.get(loss, loss)}={out / 'train' / 'adapter'}")
    train = {**common, "cache": out / "cache", "out": out / "train"}
    if replay_wanted(config):  # also when this run's stages leave out replay (built before)
        train["replay_cache"] = out / STAGE_OUTPUT["replay"]
    return {
        "chunk": {"model": config["model"], "documents": config["documents"], "out": documents},
        "generate": {**prompts, "out": out / "questions.jsonl"},
        "answer": {**prompts, "questions": out / "questions.jsonl", "out": out / "qa.jsonl"},
        "prefill": {**prompts, "qa": out / "qa.jsonl", "out": out / "cache"},
        "replay": {**prompts, "qa": out / "qa.jsonl", "out": out / STAGE_OUTPUT["replay"],
                   "student_sees_document": True},
        "train": train,
        "eval": {**prompts, "questions": config.get("eval_questions"), "out": out / "eval", "adapter": adapters},
    }


# ---------------------------------------------------------------- one stage's plan


def config_class(stage: str):
    module, name = STAGE_CONFIGS[stage]
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CommandError(f"stage {stage} is not available ({module}.{name}: {e})") from None


def _legacy_keys(cls, section: dict) -> dict:
    """Config files written for the old flags keep working: `no_progress: true` is
    `progress: false` (a switch `--no-X` of a boolean setting X)."""
    names = set(C.field_names(cls))
    result = {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if name.startswith("no_") and name[3:] in names and name not in names and isinstance(value, bool):
            result[name[3:]] = not value
        else:
            result[key] = value
    return result


def _split_section(stage: str, section: dict, wired: dict):
    """(settings keys, extra options); InputError for keys the pipeline sets itself."""
    extras, settings = {}, {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if (name in wired and name not in EXTRA_KEYS.get(stage, {})) or name in CONTROLLED.get(stage, ()):
            raise InputError(f"[{stage}] cannot set {key!r}: the pipeline sets it"
                             + (" (a top-level key)" if name in TOP_LEVEL_KEYS else ""))
        (extras if name in EXTRA_KEYS.get(stage, {}) else settings)[key] = value
    return settings, {str(k).replace("-", "_"): v for k, v in extras.items()}


def _extra_value(stage: str, name: str, value):
    is_list = EXTRA_KEYS[stage][name]
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values) or (not is_list and len(values) != 1):
        kind = "a list of strings" if is_list else "a string"
        raise InputError(f"{stage}.{name}: expected {kind}, got {value!r}")
    return values if is_list else values[0]


def _wiring_argv(wired: dict) -> list[str]:
    """The pipeline's own option values as `--flag=value` tokens (`=` keeps a value that
    starts with '-' a value)."""
    argv = []
    for name, value in wired.items():
        for v in (value if isinstance(value, list) else [value]):
            if v is not None:
                argv.append(f"--{name.replace('_', '-')}={v}")
    return argv


class _RaisingParser(argparse.ArgumentParser):
    """An argument parser whose errors are InputErrors (it parses only the pipeline's wiring)."""

    def error(self, message):
        raise InputError(message)


def plan_stage(stage: str, config: dict, wired: dict) -> StagePlan:
    """Check a stage's section and build what its `run(args)` gets; nothing runs."""
    from pdengine.cli import stage_functions

    cls = config_class(stage)
    settings_section, extras = _split_section(stage, _legacy_keys(cls, _section(config, stage)), wired)
    wired = dict(wired)
    overrides = {name: wired[name] for name in C.field_names(cls) if name in wired}  # e.g. prefill's system
    settings = C.from_mapping(cls, settings_section, stage, **overrides)
    for name, value in extras.items():
        value = _extra_value(stage, name, value)
        wired[name] = [*wired.get(name, []), *value] if isinstance(value, list) else value
    add_arguments, run = stage_functions(COMMANDS.get(stage, stage))
    parser = _RaisingParser(prog=f"pdengine {stage}", add_help=False)
    add_arguments(parser)
    wired = _model_options_for(stage, wired)
    try:
        namespace = parser.parse_args(_wiring_argv({k: v for k, v in wired.items() if k not in overrides}))
    except InputError as e:
        raise CommandError(f"pdengine run cannot wire stage {stage}: {e}") from None  # a pdengine bug
    for name in C.field_names(cls):
        setattr(namespace, name, getattr(settings, name))
    return StagePlan(stage, settings, namespace, run, inputs=_external_inputs(wired, settings, config["out"]))


def _section(config: dict, stage: str) -> dict:
    """A stage's section; replay's starts from prefill's (the same teacher settings, k and
    temperature, so its cache can be mixed with the main one), its own keys on top."""
    section = dict(config.get(stage) or {})
    if stage == "replay":
        inherited = {k: v for k, v in (config.get("prefill") or {}).items()
                     if str(k).replace("-", "_") != "student_sees_document"}
        section = {**inherited, **section}
    return section


# The stages whose commands load a model (they all take pdengine.loading.add_model_arguments);
# the others (chunk reads only the tokenizer) get no model-loading options.
MODEL_STAGES = ("generate", "answer", "prefill", "replay", "train", "eval")


def _model_options_for(stage: str, wired: dict) -> dict:
    """`wired` with the model-loading options only for the stages that load a model."""
    if stage in MODEL_STAGES:
        return wired
    return {k: v for k, v in wired.items() if k not in MODEL_OPTIONS}


def _external_inputs(wired: dict, settings, out) -> list[str]:
    """Input files and directories of a stage that no earlier stage wrote (those are
    covered by the upstream fingerprint instead)."""
    out = Path(out).resolve()
    paths = [wired.get(name) or getattr(settings, name, None) for name in PATH_OPTIONS]
    paths += [spec.partition("=")[2] for spec in wired.get("adapter", [])]
    prompt = getattr(settings, "prompt", None)
    if isinstance(prompt, str) and prompt.startswith("@"):
        paths.append(prompt[1:])
    inside = [p for p in paths if p and not Path(p).resolve().is_relative_to(out)]
    return sorted(set(map(str, inside)))


def plan_pipeline(config: dict, stages: list[str]) -> list[StagePlan]:
    """Every stage's plan, in order: all sections are checked before any stage runs."""
    stages = active_stages(config, stages)
    wires = wiring(config, stages)
    return [plan_stage(stage, config, wires[stage]) for stage in stages]


def check_documents_fit(config: dict, plans: list[StagePlan]) -> None:
    """Before any stage loads the model: every document's teacher prompt (system prompt +
    document; its questions are not written yet) plus the answer budget must fit the
    model's context length. The stages check their exact sequences again."""
    from pdengine.documents import index_documents
    from pdengine.io import read_jsonl
    from pdengine.loading import load_tokenizer_and_config
    from pdengine.prompts import PromptFormat, check_context_length, teacher_prompt_ids

    by_name = {plan.name: plan for plan in plans}
    if not {"generate", "answer", "prefill", "replay"} & set(by_name):
        return
    tokenizer, model_config = load_tokenizer_and_config(config["model"])
    documents = read_jsonl(config["documents"], required=("id", "text"))
    if "chunk" in by_name:  # the stages will read the chunks: check those (cheap: tokenizer only)
        from pdengine.chunking import chunk_documents

        documents = chunk_documents(documents, tokenizer, by_name["chunk"].settings)
    documents = index_documents(documents, config["documents"])
    fmt = PromptFormat(system=config.get("system"))
    budget = by_name["answer"].settings.max_new_tokens if "answer" in by_name else 0
    lengths = [(key, len(teacher_prompt_ids(tokenizer, doc["text"], "", fmt))) for key, doc in documents.items()]
    try:
        check_context_length(model_config, lengths, budget=budget,
                             what="teacher prompt (system + document, before its question)")
    except InputError as e:
        if "chunk" in by_name:
            raise InputError(f"{e} (the chunk stage's chunk_tokens is too large for this model)") from None
        raise InputError(f"{e}, or add `chunk: {{chunk_tokens: N}}` to the config") from None


# ---------------------------------------------------------------- fingerprints and markers


def fingerprint(plan: StagePlan, upstream: str, hashes) -> str:
    """The stage's settings + wiring + input contents + the previous stage's fingerprint."""
    namespace = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(plan.namespace).items())}
    blob = json.dumps({"stage": plan.name, "settings": C.to_dict(plan.settings), "args": namespace,
                       "inputs": {path: hashes.digest(path) for path in plan.inputs}, "upstream": upstream},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def marker(out: Path, stage: str) -> Path:
    return out / ".pdengine" / f"{stage}.done"


def is_done(out: Path, stage: str, stage_fingerprint: str) -> bool:
    path = marker(out, stage)
    if not path.is_file() or not (out / STAGE_OUTPUT[stage]).exists():
        return False
    try:
        return json.loads(path.read_text()).get("fingerprint") == stage_fingerprint
    except (json.JSONDecodeError, OSError, UnicodeDecodeError, AttributeError):
        return False


# ---------------------------------------------------------------- running


def run_pipeline(args) -> int:
    """`pdengine run`: check every section, then run the stages in order, skipping the
    finished ones (see `pdengine run --help`). Under torchrun every rank runs every stage (each
    stage splits its own work); rank 0 owns OUT: its lock, the input hashes, the done markers
    and what is said, and its decisions (skip, start afresh) are every rank's."""
    config = load_config(args.config)
    stages = check_top_level(config)
    ctx = distributed.context()
    if "eval" in stages and not config.get("eval_questions"):
        _say(ctx, "eval: skipped (no eval_questions in the config)")
        stages.remove("eval")
    plans = plan_pipeline(config, stages)  # raises before OUT is touched
    check_documents_fit(config, plans)
    out = Path(config["out"])
    with distributed.main_holds_lock(ctx, out, "pdengine run"):
        hashes = distributed.on_main(ctx, lambda: _fingerprint_plans(plans, out))  # sets rank 0's
        for plan, digest in zip(plans, ctx.broadcast([p.fingerprint for p in plans])):
            plan.fingerprint = digest
        redo = False
        for plan in plans:
            redo = redo or (args.force is not None and PIPELINE.index(plan.name) >= PIPELINE.index(args.force))
            skip, fresh = ctx.broadcast((not redo and is_done(out, plan.name, plan.fingerprint),
                                         redo or marker(out, plan.name).is_file()) if ctx.is_main else None)
            if skip:
                _say(ctx, f"{plan.name}: done already, skipped")
                continue
            _run_stage(ctx, plan, out, fresh)  # a changed fingerprint starts afresh
            distributed.on_main(ctx, lambda: _mark_done(plan, out, hashes))
            redo = True  # everything after a stage that ran is redone
    _say(ctx, f"finished; outputs in {out}")
    return 0


def _fingerprint_plans(plans: list[StagePlan], out: Path):
    """Each plan's fingerprint (its settings, inputs and everything upstream); the input hashes."""
    from pdengine.input_hashes import InputHashes

    hashes = InputHashes(out / ".pdengine" / "input-hashes.json")
    upstream = ""
    for plan in plans:
        plan.fingerprint = upstream = fingerprint(plan, upstream, hashes)
    hashes.save()
    return hashes


def _mark_done(plan: StagePlan, out: Path, hashes) -> None:
    from pdengine.io import atomic_write_json

    atomic_write_json(marker(out, plan.name), {"fingerprint": plan.fingerprint, "settings": C.to_dict(plan.settings),
                                               "inputs": {p: hashes.digest(p) for p in plan.inputs}})


def _run_stage(ctx, plan: StagePlan, out: Path, fresh: bool) -> None:
    distributed.on_main(ctx, lambda: _clear_stage(plan, out, fresh))
    namespace = argparse.Namespace(**vars(plan.namespace))
    if "force" in CONTROLLED.get(plan.name, ()):  # a cache resumes when interrupted; others overwrite
        namespace.force = fresh if plan.name in RESUMABLE else True
    if plan.name == "train":
        namespace.resume = True  # continues an interrupted run; a fresh start otherwise
    _say(ctx, f"{plan.name}: running")
    try:
        code = plan.run(namespace)
    except distributed.PeerFailed:
        raise  # another rank's error, already named
    except InputError as e:
        raise InputError(f"[{plan.name}] {e}") from None
    if code:
        raise CommandError(f"stage {plan.name} failed (exit code {code})", code=int(code))


def _clear_stage(plan: StagePlan, out: Path, fresh: bool) -> None:
    marker(out, plan.name).unlink(missing_ok=True)  # an interrupted stage is never "done"
    if plan.name == "train" and fresh and (out / "train").exists():
        shutil.rmtree(out / "train")  # the pipeline's own training directory
