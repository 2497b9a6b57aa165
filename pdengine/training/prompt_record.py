"""The prompt a student was trained with, recorded and enforced (docs/DESIGN.md, "Evaluation").

A student learns the prompt it was distilled with: the chat template and the system prompt
of the teacher cache (`pdengine prefill` stores them in the manifest's "template"). The
trainer copies that record into run.json as "prompt"; `pdengine eval` asks the student its
questions with the same prompt by default and refuses another one unless told
(`--allow-other-system`): a student asked with a different system prompt is scored on a
prompt it never saw, silently.
"""
from __future__ import annotations

from pathlib import Path

from pdengine.errors import InputError
from pdengine.prompts import PromptFormat
from pdengine.training import run_dir

ALLOW_FLAG = "--allow-other-system"


def prompt_of(source) -> dict | None:
    """The prompt a teacher cache was made with (its manifest's "template"); None for a list
    of examples, whose prompt is not known."""
    manifest = getattr(source, "manifest", None)
    return manifest.get("template") if isinstance(manifest, dict) else None


def recorded_prompt(adapter_dir) -> dict | None:
    """The prompt record of the run that trained `adapter_dir` (OUT/adapter -> OUT/run.json,
    or a run.json beside the adapter's files); None when no run.json records one."""
    adapter_dir = Path(adapter_dir)
    for candidate in (adapter_dir, adapter_dir.parent):
        if (candidate / run_dir.RUN_FILE).is_file():
            prompt = run_dir.read_run(candidate).get("prompt")
            return prompt if isinstance(prompt, dict) and isinstance(prompt.get("format"), dict) else None
    return None


def _fmt(record: dict) -> PromptFormat:
    known = PromptFormat.__dataclass_fields__
    return PromptFormat(**{k: v for k, v in record["format"].items() if k in known})


def _the_one_record(adapter_dirs, allow_other: bool) -> tuple[dict | None, str | None]:
    """(record, the adapter it came from) shared by every adapter that has one."""
    found = [(str(d), r) for d in adapter_dirs if (r := recorded_prompt(d)) is not None]
    if not found:
        return None, None
    first_dir, first = found[0]
    for other_dir, other in found[1:]:
        if _fmt(other) != _fmt(first) and not allow_other:
            raise InputError(f"adapters {first_dir} and {other_dir} were trained with different prompts "
                             f"({_fmt(first)} vs {_fmt(other)}): evaluate them separately, or pass {ALLOW_FLAG}")
    return first, first_dir


def eval_format(system: str | None, adapter_dirs, allow_other: bool = False) -> tuple[PromptFormat, dict | None]:
    """(the PromptFormat eval asks with, the training record it follows or None).

    `system` None (no --system): the recorded system prompt. A given one that differs from
    the record is an InputError unless `allow_other`."""
    record, where = _the_one_record(adapter_dirs, allow_other)
    if record is None:
        return PromptFormat(system=system), None
    trained = _fmt(record)
    if system is None or system == trained.system:
        return trained, record
    if not allow_other:
        raise InputError(f"--system {system!r} differs from the system prompt {trained.system!r} that {where} "
                         f"was trained with; omit --system to use it, or pass {ALLOW_FLAG}")
    return PromptFormat(**{**trained.__dict__, "system": system}), None


def check_template(tokenizer, fmt: PromptFormat, record: dict | None, allow_other: bool = False) -> None:
    """InputError when the tokenizer's chat template is not the one the student was trained with."""
    from pdengine.fingerprints import template_fingerprint

    if record is None or allow_other or "fingerprint" not in record:
        return
    if template_fingerprint(tokenizer, fmt)["fingerprint"] != record["fingerprint"]:
        raise InputError("the model's prompt template differs from the one the adapters were trained with "
                         f"(template fingerprint {record['fingerprint']}); evaluate with the training model, "
                         f"or pass {ALLOW_FLAG}")
