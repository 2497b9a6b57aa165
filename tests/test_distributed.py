"""pdengine.distributed with gloo and 2 processes started as torchrun starts them (env variables)."""
import json
import os

import torch
import torch.multiprocessing as mp
from helpers import end_rank, free_port

from pdengine import distributed


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = distributed.context()
    units = ctx.my_units(7)
    gathered = distributed.map_units(ctx, 7, lambda i: f"unit{i}@{rank}")
    total = ctx.all_reduce_sum(torch.tensor([float(rank + 1)]))
    shared = ctx.broadcast({"from": rank})
    from pdengine.training import parallel

    reached, unreached = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    if rank == 0:  # a LoRA parameter one rank's share reaches, and one no share reaches
        reached.grad = torch.full((2,), 3.0)
    parallel.sync_gradients(ctx, [reached, unreached])
    grads = {"reached": reached.grad.tolist(), "unreached": unreached.grad}
    ctx.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"units": units, "gathered": gathered, "total": total.item(), "shared": shared,
                   "is_main": ctx.is_main, "grads": grads}, f)
    end_rank()


def test_two_ranks_split_round_robin_and_every_rank_gets_all_units_in_order(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["units"] == [0, 2, 4, 6] and r1["units"] == [1, 3, 5]
    assert r0["gathered"] == r1["gathered"] == [f"unit{i}@{i % 2}" for i in range(7)]
    assert r0["total"] == r1["total"] == 3.0
    assert r0["shared"] == r1["shared"] == {"from": 0}
    assert r0["is_main"] and not r1["is_main"]
    # summed where any rank has a gradient; None (as one process leaves it) where none has
    assert r0["grads"] == r1["grads"] == {"reached": [3.0, 3.0], "unreached": None}


def test_one_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.shutdown()
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
    assert ctx.my_units(3) == [0, 1, 2]
    assert distributed.map_units(ctx, 3, "abc".__getitem__) == ["a", "b", "c"]
    assert ctx.broadcast(5) == 5
    distributed.shutdown()
