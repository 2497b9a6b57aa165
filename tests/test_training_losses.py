"""pdengine.training.losses: the three losses train; batch_loss for other loops."""
import math

import pytest
import torch
from train_helpers import K, TEMPERATURE, checkpoint_names, config, make_cache, metrics, teacher_items, tiny_model

import pdengine
from pdengine.train import TrainConfig, batch_loss, compute_loss, pack_teacher, train
from pdengine.training.losses import teacher_logprobs


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model())


@pytest.mark.parametrize("loss", ["pd", "sft", "online_kl"])
def test_each_loss_trains_and_lowers_the_loss(tmp_path, items, loss):
    model = tiny_model()
    result = train(model, None, items, tmp_path, config(loss=loss, epochs=2, lr=1e-2))
    rows = metrics(tmp_path)
    assert result["steps"] == len(rows) == 6  # 3 packed batches per epoch
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert math.isfinite(last) and last < first
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert checkpoint_names(tmp_path) == ["step-0000004.safetensors", "step-0000006.safetensors"]


def test_online_kl_teacher_rows_match_one_forward_per_sequence(items):
    model = tiny_model()
    got = teacher_logprobs(model, pack_teacher(items[:3]), TEMPERATURE)
    want = []
    with torch.no_grad():
        for item in items[:3]:
            logits = model(torch.tensor([item["teacher_input_ids"]])).logits[0]
            start, n = item["answer_start_teacher"], len(item["topk_ids"])
            want.append(torch.log_softmax(logits[start - 1 : start - 1 + n] / TEMPERATURE, -1))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)
    # and the cached top-k (made from the same teacher) is its top-k
    top = torch.cat([torch.as_tensor(item["topk_ids"]) for item in items[:3]])
    torch.testing.assert_close(got.gather(1, top), torch.cat(want).gather(1, top))
    assert torch.equal(got.topk(K, dim=-1).indices.sort(-1).values, top.sort(-1).values)


def test_plain_pytorch_loop_from_the_docstring(items):
    """The loop in pdengine.train's module docstring, on a list-backed source."""
    from pdengine.train import ExampleSource

    model = tiny_model()
    cfg = TrainConfig(temperature=TEMPERATURE)
    pdengine.add_lora(model, 4, 8, target_modules=list(cfg.lora_targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for epoch in range(3):
        for batch in ExampleSource(items).batches(64, seed=0, epoch=epoch):
            loss = compute_loss(model, batch, cfg)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert len(losses) == 3 and losses[-1] < losses[0]


def _readme_snippet_without_the_helper(model, batch):
    """What the README's old snippet did with a packed batch: one plain forward of the
    row (positions running on, sequences seeing each other)."""
    hidden = model.model(batch["input_ids"]).last_hidden_state[0]
    loss_fn = pdengine.LinearTopKKL(temperature=TEMPERATURE, mode="tail")
    return loss_fn(hidden[batch["target_positions"]], model.lm_head.weight, batch["topk_ids"], batch["topk_logprobs"])


def test_batch_loss_is_compute_loss_on_a_packed_cache_batch(tmp_path):
    model, _, cache = make_cache(tmp_path)
    pdengine.add_lora(model, 4, 8)
    batch = next(cache.batches(200, seed=0))
    assert len(batch["indices"]) > 1  # several sequences packed in one row
    for loss in ("pd", "sft"):
        want = compute_loss(model, batch, TrainConfig(loss=loss, temperature=TEMPERATURE))
        got = batch_loss(model, batch, loss=loss, temperature=TEMPERATURE)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the helper exists because the obvious hand-written version gives another loss
    naive = _readme_snippet_without_the_helper(model, batch).item()
    right = batch_loss(model, batch, temperature=TEMPERATURE).item()
    assert abs(naive - right) > 0.05 * right


def test_batch_loss_backpropagates_into_the_adapters(tmp_path):
    model, _, cache = make_cache(tmp_path)
    pdengine.add_lora(model, 4, 8)
    batch_loss(model, next(cache.batches(200, seed=0)), temperature=TEMPERATURE).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
