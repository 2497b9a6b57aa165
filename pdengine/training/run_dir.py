"""The run directory: run.json, metrics.jsonl and what a resume may change.

    OUT/run.json        the settings, the cache (and replay cache) identities, the model, the
                        prompt the cache was made with (`prompt_record`), the init adapter
    OUT/metrics.jsonl   one JSON line per optimizer step (val_loss on the steps that validate)
    OUT/tensorboard/    the same scalars, when tensorboard is installed (`tensorboard_log`)
    OUT/checkpoints/    see `pdengine.training.checkpoints`
    OUT/adapter/        the final adapter (PEFT format)

run.json is written once the first optimizer step has succeeded, so a start that fails
(a bad flag value, a cache too long for batch_tokens, bad token ids) leaves nothing that
blocks the corrected command. A resume reads its settings from run.json and refuses any
change that would alter the result (docs/DESIGN.md, "Checkpoints and resume").
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pdengine.errors import InputError
from pdengine.io import atomic_write_json, write_jsonl
from pdengine.training.config import TrainConfig, result_settings

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def read_run(out: Path) -> dict | None:
    """The run.json of `out` (None when there is none); InputError when it is damaged."""
    path = Path(out) / RUN_FILE
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is corrupt ({e}); remove {out} to start afresh") from None
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise InputError(f"{path} has no 'config' mapping: not a pdengine training run, or damaged; "
                         f"remove {out} (or restore run.json) to continue")
    return run


def saved_config(run: dict, path: Path) -> TrainConfig:
    """The TrainConfig recorded in a run.json (InputError naming unknown or bad settings)."""
    from pdengine.config import from_mapping

    return from_mapping(TrainConfig, run["config"], where=str(path / RUN_FILE))


def write_run(out: Path, config: TrainConfig, cache_identity: dict, replay_identity: dict | None,
              model_name: str, prompt: dict | None = None, attn_implementation: str | None = None) -> None:
    """`prompt`: the cache manifest's template record (chat template fingerprint and the
    PromptFormat, system prompt included) that `pdengine eval` holds the student to.
    `attn_implementation`: the attention kernels the student trained with (informative)."""
    atomic_write_json(Path(out) / RUN_FILE, {"config": config.to_dict(), "cache": cache_identity,
                                             "replay_cache": replay_identity, "model": model_name,
                                             "prompt": prompt, "init_adapter": adapter_identity(config.init_adapter),
                                             "attn_implementation": attn_implementation})


def adapter_identity(path) -> dict | None:
    """What the run started from with init_adapter: the adapter's files' sha256 (the path is
    informative). Only recorded: a resume restores every LoRA weight from its checkpoint."""
    if not path:
        return None
    digest = hashlib.sha256()
    for name in sorted(p.name for p in Path(path).iterdir() if p.is_file()):
        digest.update(name.encode() + b"\0" + (Path(path) / name).read_bytes())
    return {"path": str(Path(path).resolve()), "content": digest.hexdigest()[:32]}


def check_fresh(out: Path) -> None:
    """A new run needs a directory without another run's files."""
    taken = [name for name in (RUN_FILE, METRICS_FILE, "checkpoints", "adapter") if (Path(out) / name).exists()]
    if taken:
        raise InputError(f"--out {out} already holds a run ({', '.join(taken)}); pass --resume to continue it "
                         "or choose another directory")


def _comparable(identity: dict | None):
    """An identity without its informative path: a moved cache is still the same cache."""
    return None if identity is None else {k: v for k, v in identity.items() if k != "path"}


def setting_changes(out: Path, run: dict, config: TrainConfig) -> list[str]:
    """The settings that differ from run.json and would change the result."""
    old, new = saved_config(run, Path(out)).to_dict(), config.to_dict()
    return [f"{name} {old[name]!r} -> {new[name]!r}" for name in result_settings() if old[name] != new[name]]


def identity_changes(run: dict, cache_identity: dict, replay_identity: dict | None) -> list[str]:
    """The data (cache, replay cache) that is not the data run.json recorded."""
    changes = []
    for key, identity in (("cache", cache_identity), ("replay_cache", replay_identity)):
        if _comparable(run.get(key)) != _comparable(identity):
            changes.append(f"{key} {_describe(run.get(key))} -> {_describe(identity)}")
    return changes


def refuse_changes(out: Path, changes: list[str]) -> None:
    if changes:
        raise InputError(f"cannot resume {out}: {'; '.join(changes)} (these change the result; "
                         "use another --out for a new run)")


def check_resume(out: Path, run: dict, config: TrainConfig, cache_identity: dict,
                 replay_identity: dict | None) -> None:
    """InputError listing every change that would make the resumed run differ from the
    uninterrupted one; `RESUMABLE_SETTINGS` (max_steps, logging, ...) may change."""
    refuse_changes(out, setting_changes(out, run, config) + identity_changes(run, cache_identity, replay_identity))


def _describe(identity: dict | None) -> str:
    if identity is None:
        return "none"
    where = identity.get("path") or identity.get("kind", "data")
    return f"{where} ({identity.get('items')} items, content {identity.get('content')})"


def repair_metrics(out: Path, step: int) -> None:
    """Keep the metric lines of steps up to `step` (the checkpoint resumed from).

    A kill can leave a partial last line: it is dropped like the lines of steps after the
    checkpoint. A damaged line elsewhere is an InputError naming the file and line."""
    path = Path(out) / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            if number == len(lines):  # the last line, cut short by a kill
                break
            raise InputError(f"{path}:{number}: not a JSON line; remove the line (or the file) to resume") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise InputError(f"{path}:{number}: a metrics line needs an integer 'step'")
        rows.append(row)
    kept = [r for r in rows if r["step"] <= step]
    if kept:
        write_jsonl(path, kept)
    else:
        path.unlink()


def append_metrics(out: Path, row: dict) -> None:
    with (Path(out) / METRICS_FILE).open("a") as f:
        f.write(json.dumps(row) + "\n")
