"""The prompt a student was trained with: recorded in run.json from the cache, used and
enforced by `pdengine eval` (issue 15 item 5)."""
import json

import pytest
from train_helpers import DOCUMENTS, QA, config, make_cache

from pdengine import cli
from pdengine import evaluate as ev
from pdengine import generation
from pdengine.errors import InputError
from pdengine.prompts import PromptFormat
from pdengine.train import train
from pdengine.training import prompt_record, run_dir

SYSTEM = "You answer from Ada's notebook."


def _run_with_prompt(out, system, fingerprint="f" * 16):
    record = {"fingerprint": fingerprint, "chat_template": False,
              "format": {"system": system, "separator": "\n\n", "question_prefix": ""}}
    run_dir.write_run(out, config(), {"items": 1}, None, "tiny", record)
    (out / "adapter").mkdir()
    return out / "adapter"


def test_trainer_records_the_caches_system_prompt_and_template(tmp_path):
    model, tokenizer, cache = make_cache(tmp_path, fmt=PromptFormat(system=SYSTEM))
    train(model, tokenizer, cache, tmp_path / "run", config(max_steps=1))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["prompt"] == cache.manifest["template"]
    assert run["prompt"]["format"]["system"] == SYSTEM
    assert prompt_record.recorded_prompt(tmp_path / "run" / "adapter") == cache.manifest["template"]


def test_eval_format_uses_the_recorded_prompt_and_refuses_another(tmp_path):
    adapter = _run_with_prompt(tmp_path, SYSTEM)
    fmt, record = prompt_record.eval_format(None, [adapter])
    assert fmt == PromptFormat(system=SYSTEM) and record["fingerprint"] == "f" * 16
    assert prompt_record.eval_format(SYSTEM, [adapter])[0] == fmt  # the same one, given explicitly
    with pytest.raises(InputError, match="differs from the system prompt .* --allow-other-system"):
        prompt_record.eval_format("Be brief.", [adapter])
    fmt, record = prompt_record.eval_format("Be brief.", [adapter], allow_other=True)
    assert fmt.system == "Be brief." and record is None
    # no run.json (an adapter from elsewhere): --system as given, nothing enforced
    (tmp_path / "elsewhere" / "adapter").mkdir(parents=True)
    assert prompt_record.eval_format(None, [tmp_path / "elsewhere" / "adapter"]) == (PromptFormat(), None)


def test_adapters_trained_with_different_prompts_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _run_with_prompt(tmp_path / "a", SYSTEM), _run_with_prompt(tmp_path / "b", "Be brief.")
    with pytest.raises(InputError, match="trained with different prompts"):
        prompt_record.eval_format(None, [first, second])


def test_check_template_refuses_another_chat_template(tmp_path):
    from train_helpers import model_dir

    from pdengine.fingerprints import template_fingerprint

    _, tokenizer = model_dir(tmp_path / "model")
    fmt = PromptFormat(system=SYSTEM)
    record = template_fingerprint(tokenizer, fmt)
    prompt_record.check_template(tokenizer, fmt, record)  # the same template: accepted
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(InputError, match="prompt template differs"):
        prompt_record.check_template(tokenizer, fmt, record)
    prompt_record.check_template(tokenizer, fmt, record, allow_other=True)


def _eval_argv(tmp_path, adapter, *extra):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QA[:2]))
    return ["eval", "--model", str(tmp_path / "model"), "--documents", str(tmp_path / "docs.jsonl"),
            "--questions", str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "report"),
            "--adapter", f"prompt_distillation={adapter}", "--methods", "closed_book", *extra]


def test_eval_cli_asks_with_the_trained_system_prompt(tmp_path, monkeypatch, capsys):
    model, tokenizer, cache = make_cache(tmp_path, fmt=PromptFormat(system=SYSTEM))
    train(model, tokenizer, cache, tmp_path / "run", config(max_steps=1))
    adapter = tmp_path / "run" / "adapter"
    capsys.readouterr()  # the model save's progress bars
    # a different --system is refused in one line, before any model loads
    monkeypatch.setattr(generation, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    assert cli.main(_eval_argv(tmp_path, adapter, "--system", "Be brief.")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--allow-other-system" in err[0] and SYSTEM in err[0]
    # without --system, eval asks with the one the cache (and so run.json) recorded
    seen = {}

    class Stop(Exception):
        pass

    def fake_evaluate(*args, fmt, **kwargs):
        seen["fmt"] = fmt
        raise Stop

    monkeypatch.setattr(generation, "load_model", lambda *a, **k: (model, tokenizer))
    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    with pytest.raises(Stop):
        cli.main(_eval_argv(tmp_path, adapter))
    assert seen["fmt"] == PromptFormat(system=SYSTEM)
    with pytest.raises(Stop):
        cli.main(_eval_argv(tmp_path, adapter, "--system", "Be brief.", "--allow-other-system"))
    assert seen["fmt"].system == "Be brief."
    monkeypatch.undo()  # a real (tiny) eval: report.json says which prompt it asked with
    assert cli.main(_eval_argv(tmp_path, adapter, "--max-new-tokens", "2")) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["prompt_format"]["system"] == SYSTEM
