"""Crash consistency: a training run SIGKILLed at two points resumes to the bit-identical adapter.

Each killed run is a real subprocess that kills itself with SIGKILL at a chosen point
(half-way through writing a checkpoint; half-way through a metrics line), so nothing
gets to clean up. Resuming must give exactly the adapter and the metrics of a run that
was never interrupted.
"""
import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from train_helpers import adapter_tensors, checkpoint_names, config, metrics, teacher_items, tiny_model

from pdengine.train import train

SETTINGS = dict(epochs=3, save_every=2)  # 3 batches an epoch: 9 steps, checkpoints at 2, 4, 6, 8, 9

SCRIPT = r'''
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from train_helpers import config, teacher_items, tiny_model
from pdengine.train import train
from pdengine.training import checkpoints, run_dir

out, phase, step = sys.argv[2], sys.argv[3], int(sys.argv[4])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if phase == "checkpoint":  # killed while the step's checkpoint is half written
    def dying_write(path, data):
        if path.name == f"step-{step:07d}.safetensors":
            (path.parent / f".{path.name}.killed.tmp").write_bytes(data[: len(data) // 2])
            die()
        real_write(path, data)
    real_write, checkpoints.atomic_write_bytes = checkpoints.atomic_write_bytes, dying_write
else:  # killed while the step's metrics line is half written
    def dying_append(out_dir, row):
        if row["step"] == step:
            with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row)[:25])
            die()
        real_append(out_dir, row)
    real_append, run_dir.append_metrics = run_dir.append_metrics, dying_append

train(tiny_model(), None, teacher_items(tiny_model()), out, config(**json.loads(sys.argv[5])),
      resume=phase != "checkpoint")
'''


def _killed_run(tmp_path, out, phase, step):
    script = tmp_path / "killed_run.py"
    script.write_text(SCRIPT)
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, str(script), tests, str(out), phase, str(step), json.dumps(SETTINGS)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_sigkilled_training_resumes_to_the_same_adapter(tmp_path):
    items = teacher_items(tiny_model())
    straight = tiny_model()
    train(straight, None, items, tmp_path / "straight", config(**SETTINGS))

    out = tmp_path / "killed"
    _killed_run(tmp_path, out, "checkpoint", 4)  # leaves checkpoint 2, metrics of steps 1-4, a stale temp file
    assert checkpoint_names(out) == ["step-0000002.safetensors"]
    _killed_run(tmp_path, out, "metrics", 7)  # resumes from 2; leaves checkpoint 6 and half of line 7
    assert (out / "metrics.jsonl").read_text().splitlines()[-1].startswith('{"loss"')
    resumed = tiny_model()
    result = train(resumed, None, items, out, config(**SETTINGS), resume=True)

    assert result["steps"] == 9 and result["epochs"] == 3
    assert not list((out / "checkpoints").glob(".*.tmp"))
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    want = [{k: r[k] for k in ("step", "epoch", "loss", "grad_norm", "lr")} for r in metrics(tmp_path / "straight")]
    got = [{k: r[k] for k in ("step", "epoch", "loss", "grad_norm", "lr")} for r in metrics(out)]
    assert got == want
