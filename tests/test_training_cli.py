"""`pdengine train` (pdengine.training.cli): flags from TrainConfig, resume from run.json, the error contract."""
import json

import pytest
from train_helpers import K, QA, TEMPERATURE, cli, config, make_cache, metrics, model_dir

from pdengine.cache import TeacherCache
from pdengine.cli import main
from pdengine.errors import InputError
from pdengine.train import TrainConfig, train


def _common(tmp_path, out="run"):
    return ["--model", str(tmp_path / "model"), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / out),
            "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--batch-tokens", "32", "--no-progress",
            "--device", "cpu", "--epochs", "3"]


def test_flags_are_generated_from_train_config():
    import argparse

    from pdengine.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "o", "--lora-targets", "q_proj,v_proj", "--rslora", "--no-bf16",
                              "--lr", "2e-4"])
    cfg = config_from_args(args)
    assert cfg == TrainConfig(lora_targets=("q_proj", "v_proj"), rslora=True, bf16=False, lr=2e-4)
    assert config_from_args(parser.parse_args(["--out", "o"])) == TrainConfig()
    with pytest.raises(InputError, match="lr must be a finite number"):
        config_from_args(parser.parse_args(["--out", "o", "--lr", "nan"]))


def test_cli_trains_from_a_teacher_cache_and_resumes_without_repeating_flags(tmp_path, capsys, monkeypatch):
    make_cache(tmp_path)
    assert cli([*_common(tmp_path), "--max-steps", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert main(["train", *_common(tmp_path), "--max-steps", "3"]) == 2  # the out dir holds a run
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("pdengine train: error: --out ")
    assert "already holds a run" in captured.err and len(captured.err.strip().splitlines()) == 1
    # only --out, --resume and what may change: the rest comes from run.json
    assert cli(["--out", str(tmp_path / "run"), "--resume", "--max-steps", "3", "--device", "cpu"]) == 0
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["lr"] == 1e-2
    import pdengine.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a refused resume must not load the model")

    with monkeypatch.context() as patch:
        patch.setattr(pdengine.loading, "load_model_and_tokenizer", no_loading)
        assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--lr", "0.5"]) == 2
    assert "lr 0.01 -> 0.5" in capsys.readouterr().err
    from pdengine.lora import load_adapter
    from transformers import LlamaForCausalLM

    reloaded = load_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "model"), tmp_path / "run" / "adapter")
    assert any("lora_" in n for n, _ in reloaded.named_parameters())


def test_cli_refuses_a_cache_of_another_model_on_stderr(tmp_path, capsys):
    _, tokenizer, _ = make_cache(tmp_path)
    other, _ = model_dir(tmp_path / "other", seed=1)  # same shapes, other weights: not the cache's model
    argv = _common(tmp_path, out="run2")
    argv[1] = str(tmp_path / "other")
    assert main(["train", *argv]) == 2
    captured = capsys.readouterr()
    assert "does not match" in captured.err and captured.out == ""
    with pytest.raises(InputError, match="does not match: model"):
        train(other, tokenizer, TeacherCache(tmp_path / "cache"), tmp_path / "run3", config())


def test_cli_non_finite_loss_exits_1_with_one_line(tmp_path, capsys):
    make_cache(tmp_path)
    assert main(["train", *_common(tmp_path), "--lr", "1e30", "--max-grad-norm", "0", "--warmup-ratio", "0"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].startswith("pdengine train: error: non-finite loss")
    assert "Traceback" not in captured.err


def test_cli_non_finite_loss_keeps_its_traceback_with_pdengine_debug(tmp_path, monkeypatch):
    from pdengine.train import TrainingError

    make_cache(tmp_path)
    monkeypatch.setenv("PDENGINE_DEBUG", "1")
    with pytest.raises(TrainingError, match="non-finite loss"):
        main(["train", *_common(tmp_path), "--lr", "1e30", "--max-grad-norm", "0", "--warmup-ratio", "0"])


def test_cli_mixes_a_replay_cache_where_the_student_reads_the_document(tmp_path):
    from pdengine.prefill import prefill

    model, tokenizer, _ = make_cache(tmp_path, QA[:2])
    replay = prefill(model, tokenizer, *_replay_inputs(), tmp_path / "replay", k=K, temperature=TEMPERATURE,
                     progress=False, student_sees_document=True)
    assert len(replay[0]["student_input_ids"]) > len(replay[0]["teacher_input_ids"]) - 1  # document included
    argv = [*_common(tmp_path)[:-2], "--epochs", "2", "--replay-cache", str(tmp_path / "replay"),
            "--replay-fraction", "0.3", "--lr", "1e-5"]
    assert cli(argv) == 0
    rows = metrics(tmp_path / "run")
    main_tokens = sum(len(TeacherCache(tmp_path / "cache")[i]["student_input_ids"]) for i in range(2))
    assert len(rows) == 2  # one main batch per epoch ...
    assert all(r["tokens"] > main_tokens * r["step"] for r in rows)  # ... plus replay tokens every step
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["replay_cache"]["path"] == str(tmp_path / "replay") and saved["replay_cache"]["items"] == 2


def _replay_inputs():
    from train_helpers import DOCUMENTS

    return DOCUMENTS, QA[2:]


def test_a_second_trainer_on_the_same_out_exits_2_naming_the_holder(tmp_path, capsys):
    from pdengine.locking import DirectoryLock

    make_cache(tmp_path)
    with DirectoryLock(tmp_path / "run", purpose="pdengine train --out run (first)"):
        assert main(["train", *_common(tmp_path), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "in use by another pdengine process" in err and "(first)" in err
    assert not (tmp_path / "run" / "run.json").exists()
    assert main(["train", *_common(tmp_path), "--max-steps", "1"]) == 0  # the lock is free again
