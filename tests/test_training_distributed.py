"""Training under torchrun (2 gloo processes started with torchrun's env variables): DDP and
FSDP2 train the one-process adapter (relative difference <= 1e-5 after 8 steps), a killed or
stopped job resumes, and an error on one rank stops both.

Two launches of 2 processes run every distributed job (start-up costs seconds per launch);
the one-process references run in the test process. LoRA dropout is on: a rank's share draws
the one-process masks (`lora.dropout_row_offset`), except on the NF4 base (dropout 0 there).
"""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from helpers import end_rank, free_port, torchrun
from train_helpers import config, metrics, teacher_items, tiny_model

from pdengine.distributed import Context
from pdengine.errors import InputError
from pdengine.locking import DirectoryLock
from pdengine.train import train

# 8 items, 2 held out, 3 per batch (24 tokens): 2 batches an epoch; 5 epochs, stopped at 8 steps.
# The replay examples make every step split two batches; the held-out pair a validation loss.
SETTINGS = dict(epochs=5, max_steps=8, save_every=4, val_fraction=0.25, replay_fraction=0.25, eval_every=4,
                lora_dropout=0.2)
NF4_SETTINGS = SETTINGS  # dropout 0.2 on the NF4 base too: its shares draw the one-process masks
TOLERANCE = 1e-5


def items(model=None):
    return teacher_items(model or tiny_model(seed=7))  # another model's top-k: a loss far from zero


def nf4_model(seed=0):
    """An NF4 base (hidden 64: bitsandbytes' CPU kernels need in_features % 64 == 0)."""
    from helpers import tiny_model as family_model
    from train_helpers import VOCAB

    from pdengine import qlora

    dense = family_model("llama", vocab_size=VOCAB, seed=seed, tie_word_embeddings=False, hidden_size=64,
                         intermediate_size=128)
    return qlora.quantize_model(dense, "nf4")


def nf4_run(out, **settings):
    model = nf4_model()
    return train(model, None, items(nf4_model(seed=7)), out, config(**settings), replay_cache=replay())


def replay():
    return [{"input_ids": item["student_input_ids"], "answer_start": item["answer_start_student"]}
            for item in teacher_items(tiny_model(seed=8), n=4, seed=3)]


def _run_job(job: dict, rank: int) -> None:
    from pdengine.training import checkpoints

    if job.get("die_after_step") and rank == 0:  # SIGKILL-like: right after the checkpoint file
        real = checkpoints.save_checkpoint

        def save_then_die(out, step, *args, **kwargs):
            path = real(out, step, *args, **kwargs)
            if step == job["die_after_step"]:
                os._exit(9)
            return path
        checkpoints.save_checkpoint = save_then_die
    cfg = config(**{**SETTINGS, **job.get("settings", {})})
    try:
        if job.get("nf4"):
            result = nf4_run(job["out"], **NF4_SETTINGS)
        else:
            result = train(tiny_model(), None, items(), job["out"], cfg, replay_cache=replay(),
                           resume=job.get("resume", False))
    except InputError as e:
        result = {"error": str(e)}
    Path(job["out"], f"result-{rank}.json").write_text(json.dumps(result))


def _rank(rank, world, port, jobs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: two ranks share the CI's two cores
    for job in jobs:
        _run_job(job, rank)
    end_rank()


def launch(jobs, world=2):
    mp.spawn(_rank, args=(world, free_port(), jobs), nprocs=world, join=True)


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


def assert_same_run(out: Path, reference: Path):
    assert max_relative_difference(adapter(out), adapter(reference)) <= TOLERANCE
    rows, ref = metrics(out), metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 9))
    for key in ("loss", "grad_norm", "val_loss"):
        got = [r[key] for r in rows if key in r]
        want = [r[key] for r in ref if key in r]
        assert len(got) == len(want) > 0
        assert all(abs(g - w) <= TOLERANCE * abs(w) for g, w in zip(got, want)), (key, got, want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (plain and NF4 bases), then a 2-rank launch (a locked OUT, DDP, FSDP, FSDP
    stopped at step 4) and a second one (the stopped FSDP job resumed; DDP on the NF4 base;
    a DDP job killed after step 4)."""
    root = tmp_path_factory.mktemp("dist")
    train(tiny_model(), None, items(), root / "one", config(**SETTINGS), replay_cache=replay())
    nf4_run(root / "nf4-one", **NF4_SETTINGS)
    locked = root / "locked"
    with DirectoryLock(locked, purpose="a test holding the lock"):
        launch([{"out": str(locked)}, {"out": str(root / "ddp")},
                {"out": str(root / "fsdp"), "settings": {"fsdp": True}},
                {"out": str(root / "fsdp-resumed"), "settings": {"fsdp": True, "max_steps": 4}}])
    with pytest.raises(Exception):  # rank 0 dies after step 4: the launcher stops rank 1
        launch([{"out": str(root / "fsdp-resumed"), "settings": {"fsdp": True}, "resume": True},
                {"out": str(root / "nf4"), "nf4": True}, {"out": str(root / "killed"), "die_after_step": 4}])
    return root


def test_ddp_trains_the_one_process_adapter(runs):
    assert_same_run(runs / "ddp", runs / "one")
    # only rank 0 wrote OUT: one metrics file, safetensors checkpoints, the PEFT adapter
    assert sorted(p.name for p in (runs / "ddp" / "checkpoints").iterdir()) == [
        "step-0000004.safetensors", "step-0000008.safetensors"]
    results = [json.loads((runs / "ddp" / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == {**results[1], "seconds": results[0]["seconds"], "tokens_per_s": results[0]["tokens_per_s"]}


def test_fsdp_trains_the_one_process_adapter_and_checkpoints_with_dcp(runs):
    assert_same_run(runs / "fsdp", runs / "one")
    (step4, step8) = sorted((runs / "fsdp" / "checkpoints").iterdir())
    assert step8.name == "step-0000008.dcp" and (step8 / "state.json").exists()
    assert json.loads((step8 / "state.json").read_text())["world_size"] == 2
    assert (runs / "fsdp" / "adapter" / "adapter_config.json").exists()


def test_fsdp_job_resumes_from_its_dcp_checkpoint(runs):
    assert_same_run(runs / "fsdp-resumed", runs / "one")


def test_ddp_trains_an_nf4_base_like_one_process(runs):
    assert_same_run(runs / "nf4", runs / "nf4-one")


def test_killed_ddp_job_resumes_in_one_process(runs):
    """Killed after its step-4 checkpoint; resumed by one process (another N is fine: the
    checkpoint is the replicated state, and the dropout masks do not depend on the split)."""
    killed = runs / "killed"
    assert (killed / "checkpoints" / "step-0000004.safetensors").exists()
    assert not (killed / "adapter").exists()
    train(tiny_model(), None, items(), killed, config(**SETTINGS), replay_cache=replay(), resume=True)
    assert_same_run(killed, runs / "one")


def test_an_error_on_one_rank_stops_both(runs):
    """OUT's lock is held: rank 0 fails to take it, rank 1 is told and stops too (no hang)."""
    errors = [json.loads((runs / "locked" / f"result-{r}.json").read_text())["error"] for r in (0, 1)]
    assert "a test holding the lock" in errors[0]
    assert errors[1].startswith("rank 0 of 2 stopped: ") and errors[0] in errors[1]
    assert not (runs / "locked" / "run.json").exists()


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(InputError, match="fsdp shards the model across the processes of a torchrun job"):
        train(tiny_model(), None, items(), tmp_path / "out", config(fsdp=True))
    with pytest.raises(InputError, match="fsdp_bf16 .* needs fsdp"):
        config(fsdp_bf16=True)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_a_share_draws_the_one_process_dropout_masks(base):
    """Rows [t0, T) of a layer input under dropout_row_offset(t0) get the masks of the whole, on
    a dense and on an NF4 base (so a resume may change the number of ranks on either)."""
    from pdengine import add_lora, lora

    if base == "dense":
        layer = add_lora(torch.nn.Sequential(torch.nn.Linear(64, 6)), 4, 8.0, dropout=0.5, target_modules=["0"])[0]
    else:  # a QuantizedLoRALinear of an NF4 model
        layer = add_lora(nf4_model(), 4, 8.0, dropout=0.5).model.layers[0].self_attn.q_proj
    assert (type(layer) is lora.LoRALinear) == (base == "dense")
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.train()
    x = torch.randn(12, 64)
    torch.manual_seed(3)
    whole = layer(x)
    for t0 in (1, 5):
        torch.manual_seed(3)
        with lora.dropout_row_offset(t0):
            assert torch.allclose(layer(x[t0:]), whole[t0:], atol=1e-5)
    torch.manual_seed(3)
    assert not torch.allclose(layer(x[5:]), whole[5:], atol=1e-3)  # without the offset: other masks


def test_split_batch_keeps_whole_sequences_and_every_answer_token():
    from pdengine.training.batching import pack_examples
    from pdengine.training.parallel import split_batch

    batch = pack_examples(items()[:3], indices=[5, 6, 7])
    parts = [split_batch(batch, rank, 2) for rank in range(2)]
    assert [p[0]["indices"] for p in parts] == [[5], [6, 7]]  # 8-token sequences: middles 4 | 12, 20 (of 24)
    assert sum(p[1] for p in parts) == parts[0][2] == batch["labels"].numel()
    for name in ("labels", "topk_ids"):
        assert torch.equal(torch.cat([p[0][name] for p in parts]), batch[name])
    rows = [p[0]["input_ids"][0, p[0]["target_positions"]] for p in parts]
    assert torch.equal(torch.cat(rows), batch["input_ids"][0, batch["target_positions"]])
    single = pack_examples(items()[:1])  # one sequence, two ranks: its middle is in rank 1's half
    (empty, n0, total), (whole, n1, _) = (split_batch(single, rank, 2) for rank in range(2))
    assert (n0, n1) == (0, total) and torch.equal(whole["labels"], single["labels"])
    assert empty["labels"].numel() > 0  # rank 0 still computes (the sequence, weight 0)


def test_fsdp_refuses_a_quantized_base_and_says_ddp_works():
    from helpers import tiny_model as family_model

    from pdengine import qlora
    from pdengine.training import fsdp

    fsdp.refuse_quantized(tiny_model())  # a plain base is fine
    nf4 = qlora.quantize_model(family_model("llama", hidden_size=64, intermediate_size=128), "nf4")
    with pytest.raises(InputError, match="cannot shard a quantized base .*Params4bit.*without --fsdp"):
        fsdp.refuse_quantized(nf4)


def test_torchrun_cli_error_on_rank_0_stops_rank_1(tmp_path):
    """`torchrun -m pdengine train` as a user runs it: OUT already holds a run, rank 0 says so
    before any model loads and rank 1 stops with it, silently (torchrun fails, no hang)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    done = torchrun("-m", "pdengine", "train", "--model", "m", "--cache", "c", "--out", out,
                    env={"OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("pdengine train: error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0]  # one line for the job
    # rank 0 exits 2 (rank 1 too, unless torchrun stops it first); no traceback of ours
    assert "exitcode  : 2" in done.stderr and "pdengine/training" not in done.stderr
