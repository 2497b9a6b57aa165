"""torch.distributed under `torchrun`: who am I, how the work is split, how results come back.

`torchrun --nproc_per_node N -m pdengine <command> ...` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set; `context()` joins them into one process
group (NCCL on CUDA, gloo on CPU). Without torchrun, `context()` is a one-process context
and nothing else changes: every helper below is then the identity.

The rules every stage follows (docs/DESIGN.md, "Distributed"):
- work is split in *units the one-process run already has* (a document with all its QA
  pairs, a generation batch), assigned round-robin, so each unit is computed exactly as a
  single process computes it and the combined result is identical, not merely close;
- `map_units` hands every rank the results of all units in the one-process order, so every
  rank goes on to the same next step; only rank 0 writes shared files and prints progress;
- a step that can fail on some ranks only is run through `on_every_rank` / `on_main` /
  `map_units`: when one rank fails, every rank raises (`raise_if_any_failed`), so nobody
  waits forever in a collective; the CLI then exits 2 (bad input) or 1.
"""
from __future__ import annotations

import datetime
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdengine.errors import InputError


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        """cuda:LOCAL_RANK when CUDA is there, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def my_units(self, n_units: int) -> list[int]:
        """The unit indices this rank computes: round-robin over ranks."""
        return list(range(self.rank, n_units, self.world_size))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `tensor` (in place; returned for convenience)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


class PeerFailed(InputError):
    """Raised on the ranks that did not fail when another one did: the job stops everywhere,
    and the failed rank (and rank 0, naming it) say why; the CLI prints it on rank 0 only."""

    def __init__(self, message: str, shown: bool):
        super().__init__(message)
        self.shown = shown  # printed by the CLI: on rank 0 only, so N ranks do not say it N times


def raise_if_any_failed(ctx: Context, error: Exception | None) -> None:
    """Every rank raises when one rank failed a step all of them take (a check, a lock), so no
    rank goes on to wait in a collective the failed one never joins. The failed rank raises
    its own error; the others `PeerFailed` naming it. Every rank must call this."""
    if ctx.distributed:
        messages = [None] * ctx.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        _raise_gathered(ctx, error, messages)
    if error is not None:
        raise error


def _raise_gathered(ctx: Context, error: Exception | None, messages: list) -> None:
    """Given every rank's error message (None: no error), raise on every rank when any failed."""
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if error is not None:
        if failed[0][0] != ctx.rank and failed[0][1] == str(error):
            error.shown = False  # the same bad input on several ranks: the first one says it
        raise error
    if failed:
        raise PeerFailed(f"rank {failed[0][0]} of {ctx.world_size} stopped: {failed[0][1]}", ctx.is_main)


def on_every_rank(ctx: Context, step):
    """`step()` on every rank; when it raises on any rank, every rank raises (the failed one
    its own error, `raise_if_any_failed`), so none is left waiting in the next collective."""
    result, error = None, None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001  (re-raised below, on this rank as it was)
        error = e
    raise_if_any_failed(ctx, error)
    return result


def map_units(ctx: Context, n_units: int, compute, *, check=None) -> list:
    """`[compute(0), ..., compute(n_units - 1)]` on every rank, each unit computed by one rank
    (round-robin) and the results exchanged, so every rank goes on with the one-process
    result (and the same next step: a later round, another method). One process: a plain
    loop. `check` (any picklable value, e.g. a fingerprint of the inputs) must be equal on
    every rank: a difference is a bug that would break the identity with one process.
    An error in a unit (on any rank) is raised on every rank once the others have finished
    their units (the errors travel with the results), so no rank waits in a collective."""
    if not ctx.distributed:
        return [compute(u) for u in range(n_units)]
    results, error = {}, None
    try:
        for u in ctx.my_units(n_units):
            results[u] = compute(u)
    except Exception as e:  # noqa: BLE001  (re-raised below, on this rank as it was)
        error = e
    parts = [None] * ctx.world_size  # one collective: every rank's error, check and results
    dist.all_gather_object(parts, (None if error is None else str(error), check, results))
    _raise_gathered(ctx, error, [m for m, _, _ in parts])
    if any(c != check for _, c, _ in parts):
        raise RuntimeError(f"ranks computed units of different inputs ({[c for _, c, _ in parts]}); "
                           "every rank must call with the same inputs")
    merged = {u: r for _, _, part in parts for u, r in part.items()}
    return [merged[u] for u in range(n_units)]


def on_main(ctx: Context, action):
    """`action()` on rank 0 (its result there, None elsewhere); every rank returns once it
    has finished, so a later step (the next stage of `pdengine run` or of a script) finds
    rank 0's files on every rank. Its error is raised on every rank (`raise_if_any_failed`)."""
    return on_every_rank(ctx, action if ctx.is_main else lambda: None)


@contextmanager
def main_holds_lock(ctx: Context, directory, purpose: str):
    """Rank 0 holds `directory`'s DirectoryLock for the block (under torchrun it owns the
    output directory for the job); when it cannot take it, every rank stops at once."""
    from pdengine.locking import DirectoryLock

    with ExitStack() as stack:
        on_main(ctx, lambda: stack.enter_context(DirectoryLock(directory, purpose)))
        yield


def log_stream(ctx: Context):
    """sys.stderr on rank 0, a sink elsewhere: what the whole job says once (warnings about
    its shared inputs and results) is printed by rank 0 only."""
    import io
    import sys

    return sys.stderr if ctx.is_main else io.StringIO()


_CONTEXT: Context | None = None
_JOINED = [False]  # this process joined a process group (it may have left it since)


def joined_a_group() -> bool:
    """Whether this process joined a torchrun job's process group (see pdengine/__main__.py)."""
    return _JOINED[0]


def context() -> Context:
    """The job's context, joining the process group on first use when launched by torchrun."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        _CONTEXT = Context(rank=int(os.environ.get("RANK", "0")), world_size=world,
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(_CONTEXT.local_rank)
            timeout = datetime.timedelta(seconds=int(os.environ.get("PDENGINE_DIST_TIMEOUT", "1800")))
            dist.init_process_group(backend=backend, timeout=timeout)
            _JOINED[0] = True
    return _CONTEXT


def shutdown(finished: bool = False) -> None:
    """Leave the process group (end of a command). `finished`: every rank got here without an
    error, so they first wait for each other and none closes its connections while a peer is
    still in a collective. After an error no rank waits (the failed one may never come), and
    torchrun ends the job. (The abort gloo can cause at interpreter exit is avoided in
    pdengine/__main__.py.)"""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    _CONTEXT = None
