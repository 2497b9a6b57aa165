"""pdengine.training.loop: replay mixing, accumulation, the learning-rate schedule."""
import pytest
import torch
from train_helpers import VOCAB, config, metrics, teacher_items, tiny_model

from pdengine.train import train


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model())


def test_replay_examples_are_mixed_into_every_step(tmp_path, items):
    gen = torch.Generator().manual_seed(5)
    replay = [{"input_ids": torch.randint(3, VOCAB, (10,), generator=gen).tolist(), "answer_start": 6}
              for _ in range(3)]
    model = tiny_model()
    train(model, None, items, tmp_path / "mix", config(replay_fraction=0.5, max_steps=3), replay_cache=replay)
    no_replay = tiny_model()
    train(no_replay, None, items, tmp_path / "plain", config(max_steps=3))
    mixed, plain = metrics(tmp_path / "mix"), metrics(tmp_path / "plain")
    assert len(mixed) == 3
    # the replay examples add tokens to every step and change its loss
    assert all(m["tokens"] > p["tokens"] for m, p in zip(mixed, plain))
    assert all(m["loss"] != pytest.approx(p["loss"]) for m, p in zip(mixed, plain))


def test_gradient_accumulation_groups_micro_batches_into_steps(tmp_path, items):
    result = train(tiny_model(), None, items, tmp_path, config(grad_accum=2, epochs=2))
    rows = metrics(tmp_path)
    assert result["steps"] == len(rows) == 4  # 3 micro-batches an epoch: steps of 2 + 1
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1] and result["epochs"] == 2


def test_learning_rate_warms_up_then_decays_over_all_epochs(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(epochs=4, warmup_ratio=0.25, max_steps=6))
    lrs = [r["lr"] for r in metrics(tmp_path)]  # 12 scheduled steps, 3 of warmup
    assert lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3]) and lrs[3] == pytest.approx(3e-3)
    assert lrs[5] == pytest.approx(3e-3 * 7 / 9)  # the decay runs to step 12, not to max_steps
