"""pdengine.curves: the training-curve PNG from metrics.jsonl."""
import json

import pytest
from matplotlib.image import imread

from pdengine import curves
from pdengine.errors import InputError


def _write_metrics(run_dir, rows, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (run_dir / "metrics.jsonl").write_text(text)


def _trainer_rows(n, **extra_per_step):
    """Lines as pdengine/training/loop.py writes them today (plus optional keys)."""
    rows = []
    for step in range(1, n + 1):
        row = {"loss": 3.0 / step, "grad_norm": 1.0, "lr": 1e-3 * min(1, step / 3), "step": step, "epoch": 0,
               "tokens": 100 * step, "elapsed_s": 0.1 * step, "tokens_per_s": 1000.0}
        row.update({k: f(step) for k, f in extra_per_step.items()})
        rows.append(row)
    return rows


def _lines(figure):
    return {ax.get_ylabel(): [line.get_label() for line in ax.get_lines()] for ax in figure.axes}


def test_png_of_a_trainer_run(tmp_path):
    _write_metrics(tmp_path / "run", _trainer_rows(12))
    (tmp_path / "run" / "run.json").write_text(json.dumps({"model": "/models/tiny-llama", "config": {"loss": "pd"}}))
    path = curves.plot_training_curves(tmp_path / "run")
    assert path == tmp_path / "run" / "training_curves.png"
    image = imread(path)
    assert image.shape[0] == 400 and image.shape[1] == 1000
    assert not list((tmp_path / "run").glob(".*partial*"))


def test_series_follow_the_keys_present():
    rows = _trainer_rows(4, main_loss=lambda s: 2.0 / s, replay_loss=lambda s: 1.0)
    rows.append({"step": 4, "val_loss": 1.5})  # a validation line of its own
    rows.append({"step": 2, "val_loss": 1.9})
    series = curves.curve_series(rows)
    assert list(series) == ["loss", "main_loss", "replay_loss", "val_loss", "lr"]
    assert series["val_loss"] == [(2.0, 1.9), (4.0, 1.5)]
    assert series["loss"][0] == (1.0, 3.0) and len(series["lr"]) == 4
    labels = _lines(curves.training_figure(rows))
    assert labels["loss"] == ["loss (step mean)", "main (QA) loss", "replay loss", "validation loss"]
    assert labels["learning rate"] == ["_child0"]


def test_plain_run_has_loss_and_lr_only():
    series = curves.curve_series(_trainer_rows(3))
    assert list(series) == ["loss", "lr"]
    assert "grad_norm" not in series


def test_non_finite_values_are_skipped():
    rows = _trainer_rows(3)
    rows[1]["loss"] = float("nan")
    assert [s for s, _ in curves.curve_series(rows)["loss"]] == [1.0, 3.0]


def test_empty_state_is_a_readable_figure(tmp_path):
    (tmp_path / "run").mkdir()
    path = curves.plot_training_curves(tmp_path / "run")  # no metrics.jsonl yet
    assert imread(path).ndim == 3
    figure = curves.training_figure([])
    texts = [t.get_text() for ax in figure.axes for t in ax.texts]
    assert any("no training step recorded yet" in t for t in texts)


def test_partial_last_line_is_skipped_and_damaged_line_refused(tmp_path):
    _write_metrics(tmp_path / "run", _trainer_rows(3), tail='{"loss": 0.5, "st')
    assert [r["step"] for r in curves.read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:2: not a JSON line"):
        curves.plot_training_curves(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(InputError, match="needs a numeric 'step'"):
        curves.read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_metrics_file_path_and_explicit_output(tmp_path):
    _write_metrics(tmp_path / "run", _trainer_rows(2))
    out = curves.plot_training_curves(tmp_path / "run" / "metrics.jsonl", tmp_path / "png" / "c.png")
    assert out.is_file()


def test_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such training run"):
        curves.plot_training_curves(tmp_path / "nope")


def test_title_names_model_loss_steps(tmp_path):
    _write_metrics(tmp_path, _trainer_rows(5))
    (tmp_path / "run.json").write_text(json.dumps({"model": "/m/Llama-3-8B", "config": {"loss": "sft"}}))
    title = curves._title(tmp_path, 5)
    assert title.startswith("training: m/Llama-3-8B, loss=sft, 5 steps, 20")


def test_module_command_line(tmp_path, capsys):
    _write_metrics(tmp_path / "run", _trainer_rows(3))
    assert curves.main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "training_curves.png").is_file()
    assert "training_curves.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        curves.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "no such training run" in capsys.readouterr().err
