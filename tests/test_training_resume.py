"""Resuming a run: exact, with the run's own settings, refusing changes that alter the result."""
import json

import pytest
import torch
from train_helpers import (TEMPERATURE, adapter_tensors, checkpoint_names, config, metrics, teacher_items,
                           tiny_model)

from pdengine.errors import InputError
from pdengine.locking import DirectoryLock
from pdengine.train import train


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model())


def test_resume_gives_the_same_adapter_as_a_straight_run(tmp_path, items):
    straight = tiny_model()
    train(straight, None, items, tmp_path / "a", config(max_steps=8, epochs=5))
    stopped = tiny_model()
    train(stopped, None, items, tmp_path / "b", config(max_steps=4, epochs=5))
    resumed = tiny_model()
    result = train(resumed, None, items, tmp_path / "b", config(max_steps=8, epochs=5), resume=True)
    assert result["steps"] == 8
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit
    assert [r["step"] for r in metrics(tmp_path / "b")] == list(range(1, 9))
    assert [r["loss"] for r in metrics(tmp_path / "b")] == [r["loss"] for r in metrics(tmp_path / "a")]


def test_resume_without_a_config_reads_run_json(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=2, lr=5e-3, epochs=3))
    result = train(tiny_model(), None, items, tmp_path, None, resume=True)  # no settings repeated
    assert result["steps"] == 2  # max_steps is the run's too: nothing left to do
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["config"]["lr"] == 5e-3 and saved["config"]["epochs"] == 3
    assert saved["cache"]["kind"] == "examples" and saved["cache"]["items"] == len(items)
    assert saved["replay_cache"] is None


def test_resume_refuses_every_change_that_alters_the_result(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=1))
    with pytest.raises(InputError, match="already holds a run.*--resume"):
        train(tiny_model(), None, items, tmp_path, config(max_steps=1))
    changes = r"cannot resume .*: epochs 2 -> 5; lr 0.003 -> 1.0; seed 0 -> 1 \(these change the result"
    with pytest.raises(InputError, match=changes) as e:
        train(tiny_model(), None, items, tmp_path, config(max_steps=2, lr=1.0, epochs=5, seed=1), resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"lora_r 4 -> 8.*schedule_steps None -> 9"):
        train(tiny_model(), None, items, tmp_path, config(lora_r=8, schedule_steps=9), resume=True)
    with pytest.raises(InputError, match=r"cannot resume .*: cache examples \(8 items"):
        train(tiny_model(), None, items[:6], tmp_path, config(max_steps=2), resume=True)
    replay = [{"input_ids": [5, 6, 7, 8], "answer_start": 2}]
    with pytest.raises(InputError, match=r"replay_fraction 0.0 -> 0.5; replay_cache none -> examples"):
        train(tiny_model(), None, items, tmp_path, config(replay_fraction=0.5), replay_cache=replay, resume=True)
    # what does not change the result may: extend, save more often, log differently
    result = train(tiny_model(), None, items, tmp_path,
                   config(max_steps=3, save_every=1, keep_checkpoints=3, progress=True), resume=True)
    assert result["steps"] == 3 and len(checkpoint_names(tmp_path)) == 3


def test_run_json_is_written_only_once_a_step_succeeded(tmp_path, items):
    bad = [dict(items[0], topk_ids=torch.full_like(torch.as_tensor(items[0]["topk_ids"]), 47), topk_logprobs=
                torch.full_like(torch.as_tensor(items[0]["topk_logprobs"]), float("nan")))]
    with pytest.raises(ValueError):
        train(tiny_model(), None, bad, tmp_path, config())  # the fused op refuses NaN log-probs
    assert not (tmp_path / "run.json").exists()
    result = train(tiny_model(), None, items, tmp_path, config(max_steps=1))  # the corrected command
    assert result["steps"] == 1 and (tmp_path / "run.json").is_file()
    assert json.loads((tmp_path / "run.json").read_text())["attn_implementation"] == "sdpa"  # what it trained with


def test_run_json_without_config_is_one_line_error(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=1))
    (tmp_path / "run.json").write_text('{"cache": {}}')
    with pytest.raises(InputError, match="run.json has no 'config' mapping"):
        train(tiny_model(), None, items, tmp_path, None, resume=True)
    (tmp_path / "run.json").write_text('{"config": ')
    with pytest.raises(InputError, match="run.json is corrupt"):
        train(tiny_model(), None, items, tmp_path, None, resume=True)


def test_a_partial_last_metrics_line_is_repaired(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=2))
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"loss": 1.5, "st')  # a kill in the middle of a write
    train(tiny_model(), None, items, tmp_path, config(max_steps=4), resume=True)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:2: not a JSON line"):
        train(tiny_model(), None, items, tmp_path, config(max_steps=5), resume=True)


def test_a_locked_output_directory_is_refused_naming_the_holder(tmp_path, items):
    with DirectoryLock(tmp_path, purpose="pdengine train (the other one)"):
        with pytest.raises(InputError, match=r"in use by another pdengine process \(pid \d+ .*the other one"):
            train(tiny_model(), None, items, tmp_path, config(max_steps=1))
    assert not (tmp_path / "run.json").exists()
    assert train(tiny_model(), None, items, tmp_path, config(max_steps=1))["steps"] == 1


def test_summary_counts_the_epochs_run(tmp_path, items):
    assert train(tiny_model(), None, items, tmp_path / "a", config(epochs=3))["epochs"] == 3
    assert train(tiny_model(), None, items, tmp_path / "b", config(epochs=3, max_steps=4))["epochs"] == 2


def test_temperature_must_match_the_caches(tmp_path):
    from train_helpers import make_cache

    model, tok, cache = make_cache(tmp_path)
    with pytest.raises(InputError, match=f"temperature: cache {TEMPERATURE}, given 1.0"):
        train(model, tok, cache, tmp_path / "run", config(temperature=1.0))


def test_a_replay_cache_with_fraction_0_is_not_part_of_the_run(tmp_path, items):
    replay = [{"input_ids": [5, 6, 7, 8], "answer_start": 2}]
    train(tiny_model(), None, items, tmp_path, config(max_steps=1), replay_cache=replay)
    assert json.loads((tmp_path / "run.json").read_text())["replay_cache"] is None
    assert train(tiny_model(), None, items, tmp_path, config(max_steps=2), resume=True)["steps"] == 2
