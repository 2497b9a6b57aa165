"""`pdengine train` warns once when its settings are known not to inject on a small model."""
import pytest
from train_helpers import cli, make_cache, tiny_model

from pdengine.train import TrainConfig
from pdengine.training import advice


def test_small_model_warning_only_for_the_settings_that_do_not_inject(monkeypatch):
    model = tiny_model()
    line = advice.small_model_warning(model, TrainConfig())  # the paper's 8B defaults: lr 1e-5
    assert line.startswith("warning: lr 1e-05 without embedding LoRA") and "examples/demo.yaml" in line
    assert advice.small_model_warning(model, TrainConfig(lr=3e-3)) is None
    assert advice.small_model_warning(model, TrainConfig(lora_embeddings=True)) is None
    monkeypatch.setattr(advice, "SMALL_MODEL_PARAMETERS", 1000)  # a "large" model
    assert advice.small_model_warning(model, TrainConfig()) is None


def test_lora_parameters_do_not_count():
    import pdengine

    model = tiny_model()
    before = advice.base_parameters(model)
    pdengine.add_lora(model, r=2, alpha=4)
    assert advice.base_parameters(model) == before


@pytest.mark.parametrize("lr, warned", [("1e-5", True), ("1e-2", False)])
def test_train_cli_prints_one_warning_line(tmp_path, capsys, lr, warned):
    make_cache(tmp_path)
    capsys.readouterr()
    argv = ["--model", str(tmp_path / "model"), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--lora-r", "4", "--lora-alpha", "8", "--lr", lr, "--batch-tokens", "32", "--no-progress",
            "--device", "cpu", "--max-steps", "1"]
    assert cli(argv) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "warning: lr" in x]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert lines[0].startswith("pdengine train: warning:") and "examples/demo.yaml" in lines[0]
