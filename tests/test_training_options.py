"""What trainers are expected to have (issue 15 item 7): a held-out validation loss, a
cosine schedule, continuing from an adapter, TensorBoard when installed, ce_temperature."""
import math

import pytest
import torch
from train_helpers import adapter_tensors, config, metrics, teacher_items, tiny_model

from pdengine.errors import InputError
from pdengine.train import TrainConfig, compute_loss, train
from pdengine.training import run_dir, tensorboard_log
from pdengine.training.loop import _lr_lambda
from pdengine.training.sources import ExampleSource, split_validation


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model(), n=8)


# ---------------------------------------------------------------- schedule


def test_cosine_schedule_after_the_warmup():
    linear, cosine = _lr_lambda(10, 2, "linear"), _lr_lambda(10, 2, "cosine")
    assert [linear(s) for s in (0, 1)] == [cosine(s) for s in (0, 1)] == [0.5, 1.0]
    for step in range(2, 11):
        progress = (step - 2) / 8
        assert cosine(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
        assert linear(step) == pytest.approx(1 - progress)
    assert cosine(6) == pytest.approx(0.5) and cosine(4) > linear(4)


def test_train_follows_the_cosine_schedule(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(schedule="cosine", epochs=2))
    lrs = [r["lr"] for r in metrics(tmp_path)]
    total = len(lrs)  # warmup_ratio 0 still warms up for one step; the decay spans the rest
    want = [3e-3] + [3e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / (total - 1))) for s in range(1, total)]
    assert lrs == pytest.approx(want)


# ---------------------------------------------------------------- validation


def test_split_validation_is_deterministic_and_disjoint(items):
    source = ExampleSource(items)
    trained, held = split_validation(source, 0.25)
    assert len(held) == 2 and len(trained) == 6
    assert sorted(trained.indices + held.indices) == list(range(8))
    assert split_validation(source, 0.25)[1].indices == held.indices  # whatever the seed
    assert split_validation(source, 0.0) == (source, None)
    with pytest.raises(InputError, match="none would be left to train on"):
        split_validation(ExampleSource(items[:1]), 0.5)


def test_val_loss_on_held_out_items_each_epoch_and_at_the_end(tmp_path, items):
    model = tiny_model()
    result = train(model, None, items, tmp_path, config(val_fraction=0.25, epochs=2, batch_tokens=16))
    rows = metrics(tmp_path)
    with_val = [r["step"] for r in rows if "val_loss" in r]
    per_epoch = len(rows) // 2
    assert with_val == [per_epoch, 2 * per_epoch]
    # the last val_loss is the final model's mean loss per answer token on the held-out items
    _, held = split_validation(ExampleSource(items), 0.25)
    model.eval()
    with torch.no_grad():
        losses = [(float(compute_loss(model, b, config())), b["labels"].numel())
                  for b in held.batches(16, shuffle=False)]
    want = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    assert rows[-1]["val_loss"] == pytest.approx(want, rel=1e-5) and result["val_loss"] == rows[-1]["val_loss"]
    # the held-out items are not trained on: fewer tokens than a run on all of them
    full = train(tiny_model(), None, items, tmp_path / "all", config(epochs=2, batch_tokens=16))
    assert result["tokens"] < full["tokens"]


def test_eval_every_and_resume_give_the_same_val_losses(tmp_path, items):
    cfg = config(val_fraction=0.25, epochs=2, batch_tokens=16, eval_every=2)
    train(tiny_model(), None, items, tmp_path / "straight", cfg)
    train(tiny_model(), None, items, tmp_path / "resumed", config(val_fraction=0.25, epochs=2, batch_tokens=16,
                                                                   eval_every=2, max_steps=3))
    train(tiny_model(), None, items, tmp_path / "resumed", cfg, resume=True)
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    n = len(straight)
    assert [r["step"] for r in straight if "val_loss" in r] == [s for s in range(1, n + 1) if s % 2 == 0 or s == n]
    # the same validation losses; the run stopped by max_steps also validated at its own end (step 3)
    assert [r["step"] for r in resumed if "val_loss" in r] == sorted({3, *(s for s in range(2, n + 1, 2)), n})
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"])
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"])
    with pytest.raises(InputError, match="val_fraction 0.25 -> 0.5"):  # alters the result: refused
        train(tiny_model(), None, items, tmp_path / "resumed", config(val_fraction=0.5, epochs=2, batch_tokens=16),
              resume=True)


# ---------------------------------------------------------------- init adapter


def test_init_adapter_continues_from_a_saved_adapter(tmp_path, items):
    first = tiny_model()
    train(first, None, items, tmp_path / "a", config(epochs=1))
    second = tiny_model()
    train(second, None, items, tmp_path / "b", config(epochs=1, max_steps=1, lr=1e-12,
                                                     init_adapter=str(tmp_path / "a" / "adapter")))
    for name, value in adapter_tensors(first).items():
        torch.testing.assert_close(adapter_tensors(second)[name], value)  # not a fresh init
    run = run_dir.read_run(tmp_path / "b")
    assert run["config"]["init_adapter"] == str(tmp_path / "a" / "adapter")
    assert run["init_adapter"] == run_dir.adapter_identity(tmp_path / "a" / "adapter")
    assert len(run["init_adapter"]["content"]) == 32 and run_dir.read_run(tmp_path / "a")["init_adapter"] is None
    with pytest.raises(InputError, match="already has LoRA adapters"):
        train(first, None, items, tmp_path / "c", config(init_adapter=str(tmp_path / "a" / "adapter")))
    with pytest.raises(InputError, match="is not a directory"):
        train(tiny_model(), None, items, tmp_path / "d", config(init_adapter=str(tmp_path / "missing")))


# ---------------------------------------------------------------- tensorboard


class FakeWriter:
    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_the_metrics_rows(tmp_path, items, monkeypatch):
    monkeypatch.setattr(tensorboard_log, "_summary_writer_class", lambda: FakeWriter)
    FakeWriter.instances.clear()
    train(tiny_model(), None, items, tmp_path / "run", config(epochs=1, val_fraction=0.25))
    (writer,) = FakeWriter.instances
    assert writer.closed and writer.log_dir == str(tmp_path / "run" / "tensorboard")
    rows = metrics(tmp_path / "run")
    assert [(s, v) for t, v, s in writer.scalars if t == "train/loss"] == [(r["step"], r["loss"]) for r in rows]
    assert [s for t, _, s in writer.scalars if t == "train/val_loss"] == [r["step"] for r in rows if "val_loss" in r]
    train(tiny_model(), None, items, tmp_path / "off", config(epochs=1, tensorboard=False))
    assert len(FakeWriter.instances) == 1


def test_without_tensorboard_installed_nothing_is_logged(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        assert tensorboard_log.open_writer(tmp_path, True) is None


# ---------------------------------------------------------------- ce_temperature


def test_ce_temperature_takes_the_hard_label_ce_at_its_own_temperature(items):
    model = tiny_model()
    batch = next(ExampleSource(items).batches(64, shuffle=False))
    kd = compute_loss(model, batch, config(ce_weight=0.0))
    ce_t1 = compute_loss(model, batch, TrainConfig(loss="sft"))
    mixed = compute_loss(model, batch, config(ce_weight=0.5, ce_temperature=1.0))
    torch.testing.assert_close(mixed, kd + 0.5 * ce_t1)
    fused = compute_loss(model, batch, config(ce_weight=0.5))  # default: the CE at the distillation T
    torch.testing.assert_close(compute_loss(model, batch, config(ce_weight=0.5, ce_temperature=2.0)), fused)
    assert not torch.allclose(fused, mixed)


def test_train_cli_with_a_teacher_cache_validation_cosine_and_init_adapter(tmp_path, capsys):
    import json

    from train_helpers import cli, make_cache

    make_cache(tmp_path)
    common = ["--model", str(tmp_path / "model"), "--cache", str(tmp_path / "cache"), "--lora-r", "4",
              "--lora-alpha", "8", "--lr", "1e-2", "--batch-tokens", "32", "--no-progress", "--device", "cpu",
              "--epochs", "2", "--val-fraction", "0.25", "--schedule", "cosine"]
    assert cli([*common, "--out", str(tmp_path / "a")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["val_loss"] is not None and math.isfinite(first["val_loss"])
    assert cli([*common, "--out", str(tmp_path / "b"), "--init-adapter", str(tmp_path / "a" / "adapter")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["first_loss"] < first["first_loss"]  # it starts where the first run ended
    run = run_dir.read_run(tmp_path / "b")
    assert run["config"]["schedule"] == "cosine" and run["config"]["val_fraction"] == 0.25
    assert run["config"]["init_adapter"] == str(tmp_path / "a" / "adapter")


@pytest.mark.parametrize("loss", ["sft", "online_kl"])
def test_val_fraction_with_the_other_losses(tmp_path, items, loss):
    # online_kl rebuilds the teacher from the source's items: a subset must map its indices
    result = train(tiny_model(), None, items, tmp_path, config(loss=loss, epochs=1, val_fraction=0.25))
    assert math.isfinite(result["val_loss"]) and "val_loss" in metrics(tmp_path)[-1]
