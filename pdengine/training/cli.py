"""`pdengine train`: its flags (generated from TrainConfig) and the command.

A resumed run needs no flags repeated: the settings, the cache, the replay cache and
the model come from the run's run.json, and only the flags given on the command line
are compared with them (a change that alters the result is refused; `--max-steps` to
extend, `--save-every`, `--no-progress` and the like are allowed).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pdengine import config as settings
from pdengine.errors import InputError
from pdengine.training import advice, run_dir
from pdengine.training.config import TrainConfig
from pdengine.training.loop import TrainingError
from pdengine.training.session import check_launch, train

_PATHS = ("model", "cache", "replay_cache")


def add_arguments(parser) -> None:
    """Arguments of `pdengine train`: the paths, then one flag per TrainConfig field."""
    from pdengine.loading import add_model_arguments

    add_model_arguments(parser, model_required=False,
                        model_help="local Hugging Face causal-LM directory (on --resume: the run's, from run.json)")
    parser.add_argument("--cache", default=None, help="teacher cache directory (pdengine prefill; "
                        "on --resume: the run's)")
    parser.add_argument("--out", required=True, help="output directory (adapter/, checkpoints/, metrics.jsonl)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out with its own settings")
    parser.add_argument("--replay-cache", default=None, help="a second teacher cache mixed into every step")
    settings.add_arguments(parser, TrainConfig)
    # Unset flags read as None, so a resume can tell the flags given from the defaults;
    # the help text still shows the dataclass defaults, which apply to a new run.
    parser.set_defaults(**{name: None for name in settings.field_names(TrainConfig)})


def config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    """`base` (TrainConfig defaults when None) with the flags given on the command line."""
    given = {name: getattr(args, name) for name in settings.field_names(TrainConfig)
             if getattr(args, name, None) is not None}
    values = {**(base.to_dict() if base is not None else {}), **given}
    return TrainConfig(**values)


def _paths(args, run: dict | None) -> dict:
    """--model / --cache / --replay-cache, falling back to what run.json recorded."""
    recorded = {"model": (run or {}).get("model") or None,
                "cache": ((run or {}).get("cache") or {}).get("path"),
                "replay_cache": ((run or {}).get("replay_cache") or {}).get("path")}
    paths = {name: getattr(args, name) or recorded[name] for name in _PATHS}
    for name in ("model", "cache"):
        if not paths[name]:
            raise InputError(f"--{name.replace('_', '-')} is required (a resumed run takes it from run.json)")
    return paths


def run(args) -> int:
    """`pdengine train`: load the model and cache, train, print the summary (stdout, JSON).

    Bad input raises InputError (the CLI prints it on stderr, exit 2); a non-finite loss
    is one line on stderr and exit 1 (its traceback with PDENGINE_DEBUG=1)."""
    from pdengine import distributed
    from pdengine.cache import TeacherCache
    from pdengine.distributed import on_every_rank
    from pdengine.loading import load_from_args
    from pdengine.quantize import parse_quantize
    from pdengine.training import fsdp

    out = Path(args.out)
    ctx = distributed.context()  # under torchrun: join the job before the model loads (cuda:LOCAL_RANK)
    # Rank 0 reads OUT (other nodes need not see it) and checks it before the model loads;
    # train() checks again under the lock.
    run_record = ctx.broadcast(on_every_rank(ctx, lambda: _open_out(out, args.resume) if ctx.is_main else None))
    base = run_dir.saved_config(run_record, out) if run_record is not None else None
    config = config_from_args(args, base)
    if run_record is not None:  # refuse a changed setting before the model loads
        run_dir.refuse_changes(out, run_dir.setting_changes(out, run_record, config))
    check_launch(ctx, config)  # before a model too big for one device loads
    if config.fsdp and parse_quantize(getattr(args, "quantize", None)) is not None:
        raise InputError(fsdp.quantized_refusal())  # before it loads
    paths = _paths(args, run_record)
    # --attn-implementation, --quantize; with --fsdp the weights stay on the CPU, and FSDP moves
    # each layer to this rank's GPU as it shards it, so no GPU holds the whole base
    model, tokenizer = load_from_args(args, training=True, path=paths["model"], keep_on_cpu=config.fsdp)
    warning = None if args.resume else advice.small_model_warning(model, config)
    if warning and ctx.is_main:
        print(f"pdengine train: {warning}", file=sys.stderr)
    temperature = config.temperature if config.loss == "pd" else None
    cache = TeacherCache(paths["cache"], model=model, tokenizer=tokenizer, temperature=temperature)
    replay = None
    if paths["replay_cache"]:
        replay = TeacherCache(paths["replay_cache"], model=model, tokenizer=tokenizer, temperature=temperature)
    try:
        metrics = train(model, tokenizer, cache, out, config, replay_cache=replay, resume=args.resume)
    except TrainingError as e:  # the run itself went wrong, not its input: exit 1
        if os.environ.get("PDENGINE_DEBUG") == "1":
            raise
        if ctx.is_main:
            print(f"pdengine train: error: {e}", file=sys.stderr)
        return 1
    if ctx.is_main:
        print(json.dumps(metrics, indent=2))
    return 0


def _open_out(out: Path, resume: bool) -> dict | None:
    """The run.json to resume (None for a new run, whose directory must hold no run)."""
    if resume:
        return run_dir.read_run(out)
    run_dir.check_fresh(out)
    return None
