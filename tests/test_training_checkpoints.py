"""pdengine.training.checkpoints: safetensors + JSON, never pickle; damaged files refused."""
import json

import pytest
import torch
from safetensors import safe_open
from train_helpers import checkpoint_names, config, metrics, teacher_items, tiny_model

from pdengine import modeling
from pdengine.errors import InputError
from pdengine.train import TrainingError, train
from pdengine.training import checkpoints


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model())


class _Payload:
    """Unpickling this runs `open(path, "w")`: a file appears if the checkpoint is executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoint_is_safetensors_with_json_state(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=2))
    path = tmp_path / "checkpoints" / "step-0000002.safetensors"
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format"] == checkpoints.FORMAT
    state = json.loads(meta["state"])
    assert state["step"] == 2 and state["position"]["main"] == {"epoch": 0, "index": 2}
    assert "rng/torch" in keys and any(k.startswith("optimizer/0/exp_avg") for k in keys)
    assert any(k.startswith("adapter/") and "lora_A" in k for k in keys)


def test_a_crafted_pickle_checkpoint_is_refused_not_run(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=2))
    marker = tmp_path / "pwned"
    crafted = tmp_path / "checkpoints" / "step-0000009.pt"
    torch.save({"step": 9, "adapter": _Payload(marker)}, crafted)
    with pytest.raises(InputError, match=r"step-0000009.pt is not a pdengine checkpoint.*pickle") as e:
        train(tiny_model(), None, items, tmp_path, config(max_steps=4), resume=True)
    assert "\n" not in str(e.value) and not marker.exists()
    # the same bytes under our file name: not a safetensors file, refused as well
    crafted.rename(tmp_path / "checkpoints" / "step-0000009.safetensors")
    with pytest.raises(InputError, match="step-0000009.safetensors is truncated or not a pdengine checkpoint"):
        train(tiny_model(), None, items, tmp_path, config(max_steps=4), resume=True)
    assert not marker.exists()
    copy = tmp_path / "copy.pt"
    copy.write_bytes((tmp_path / "checkpoints" / "step-0000009.safetensors").read_bytes())
    torch.load(copy, weights_only=False)
    assert marker.exists()  # the payload is real: pickle loading would have run it


def test_a_truncated_checkpoint_is_one_line_error(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=2))
    path = tmp_path / "checkpoints" / "step-0000002.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="step-0000002.safetensors is truncated or not a pdengine checkpoint"):
        train(tiny_model(), None, items, tmp_path, config(max_steps=4), resume=True)


def test_another_safetensors_file_is_not_a_checkpoint(tmp_path, items):
    from safetensors.torch import save_file

    train(tiny_model(), None, items, tmp_path, config(max_steps=2))
    save_file({"x": torch.zeros(2)}, tmp_path / "checkpoints" / "step-0000003.safetensors")
    with pytest.raises(InputError, match="step-0000003.safetensors is not a pdengine checkpoint"):
        train(tiny_model(), None, items, tmp_path, config(max_steps=4), resume=True)


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path, items):
    train(tiny_model(), None, items, tmp_path, config(max_steps=2))
    stale = [tmp_path / "checkpoints" / ".step-0000004.safetensors.abc123.tmp", tmp_path / ".run.json.x1.tmp",
             tmp_path / ".metrics.jsonl.q9.tmp", tmp_path / "adapter" / ".adapter_model.safetensors.z.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    train(tiny_model(), None, items, tmp_path, config(max_steps=3), resume=True)
    assert not any(path.exists() for path in stale)


def test_non_finite_loss_stops_and_names_the_kept_checkpoint(tmp_path, items):
    model = tiny_model()
    calls = {"n": 0}

    def poison_after_two_steps(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 2 else output

    modeling.model_body(model).norm.register_forward_hook(poison_after_two_steps)
    with pytest.raises(TrainingError, match="non-finite loss.*step 3.*last good checkpoint .*step-0000002"):
        train(model, None, items, tmp_path, config(save_every=2))
    assert checkpoint_names(tmp_path) == ["step-0000002.safetensors"]
    assert not (tmp_path / "adapter").exists()


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path, items):
    model = tiny_model()
    modeling.model_body(model).norm.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(TrainingError, match="step 1; training stopped, no checkpoint was saved yet") as e:
        train(model, None, items, tmp_path, config(save_every=2))
    assert "last good checkpoint" not in str(e.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run.json").exists()


def test_ctrl_c_writes_a_checkpoint_to_resume_from(tmp_path, items):
    model = tiny_model()
    calls = {"n": 0}

    def interrupt_in_step_three(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return output

    handle = modeling.model_body(model).norm.register_forward_hook(interrupt_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        train(model, None, items, tmp_path, config(save_every=0))
    assert checkpoint_names(tmp_path) == ["step-0000002.safetensors"]
    handle.remove()
    result = train(tiny_model(), None, items, tmp_path, config(save_every=0), resume=True)
    assert result["steps"] == len(metrics(tmp_path)) and result["steps"] > 2
