"""Data parallelism of the trainer under torchrun: the batch split and the gradient sum.

Why not `torch.nn.parallel.DistributedDataParallel`: only the LoRA parameters train, so the
one-process gradient is recovered exactly (up to the order of float additions) by

- splitting every packed batch by *sequences* (whole QA items) across the ranks
  (`split_batch`: contiguous runs, balanced by tokens), so each rank computes the very
  per-token losses one process computes for those sequences;
- weighting each rank's mean loss by its share of the batch's answer tokens (`weight`
  = local / global count), so the ranks' losses sum to the one-process mean;
- summing the LoRA gradients over the ranks (one all-reduce per dtype, `sync_gradients`)
  before the clip and the AdamW step, which then run identically on every rank.

DDP's bucketing and overlap buy little for LoRA-sized gradients, and a plain sum keeps the
one-process data order (a pure function of seed and epoch) untouched: every rank iterates
the same global batches and keeps only its share. With FSDP2 (`pdengine.training.fsdp`)
the sharded LoRA gradients are summed by FSDP's reduce-scatter and only the replicated
ones (outside the decoder body, e.g. an lm_head adapter) go through `sync_gradients`.

LoRA dropout draws the one-process masks: each share runs its forward and backward under
`lora.dropout_row_offset(token_offset)`, which shifts the layer's dropout seed so that the
keep-mask of local row t is the one of packed row token_offset + t (`LoRALinear` and a
quantized base's `QuantizedLoRALinear` alike).

A rank whose share is empty (a batch with fewer sequences than ranks) still runs a forward
and backward, on the batch's first sequence with weight 0: its gradient is zero but it
takes part in every collective (FSDP's all-gathers, the all-reduce).
"""
from __future__ import annotations

import torch

from pdengine.distributed import Context

_SLICED_BY_TOKEN = ("input_ids", "position_ids")
_SLICED_BY_TARGET = ("labels", "topk_ids", "topk_logprobs")


def sequence_owners(lengths: list[int], world_size: int) -> list[int]:
    """The rank of each sequence: the one whose equal slice of the batch's tokens holds the
    sequence's middle. Non-decreasing, so every rank gets a contiguous run."""
    total = sum(lengths)
    owners, start = [], 0
    for n in lengths:
        owners.append(min(world_size - 1, (world_size * (2 * start + n)) // (2 * total)))
        start += n
    return owners


def _slice(batch: dict, first: int, last: int, starts: list[int], rows: list[int]) -> dict:
    """Sequences [first, last) of a packed batch, re-based to start at token 0 and segment 0."""
    t0, t1 = starts[first], starts[last]
    r0, r1 = rows[first], rows[last]
    part = dict(batch)
    for key in _SLICED_BY_TOKEN:
        if key in batch:
            part[key] = batch[key][:, t0:t1]
    for key in _SLICED_BY_TARGET:
        part[key] = batch[key][r0:r1]
    part["segment_ids"] = batch["segment_ids"][t0:t1] - first
    part["target_positions"] = batch["target_positions"][r0:r1] - t0
    part["indices"] = list(batch["indices"])[first:last]
    part["token_offset"] = t0  # where the share starts in the packed row: its dropout rows
    return part


def split_batch(batch: dict, rank: int, world_size: int) -> tuple[dict, int, int]:
    """(this rank's share of a packed batch, its answer tokens, the batch's answer tokens).

    The share holds whole sequences and `token_offset`, the packed-row index of its first
    token (`lora.dropout_row_offset`); an empty share is the first sequence with 0 tokens
    counted (see the module docstring)."""
    total_rows = int(batch["labels"].shape[0])
    if world_size == 1:
        return {**batch, "token_offset": 0}, total_rows, total_rows
    segments = batch["segment_ids"]
    n_seq = len(batch["indices"])
    lengths = torch.bincount(segments, minlength=n_seq).tolist()
    per_seq = torch.bincount(segments[batch["target_positions"]], minlength=n_seq).tolist()
    starts, rows = [0], [0]
    for n, m in zip(lengths, per_seq):
        starts.append(starts[-1] + n)
        rows.append(rows[-1] + m)
    mine = [i for i, owner in enumerate(sequence_owners(lengths, world_size)) if owner == rank]
    if not mine:
        return _slice(batch, 0, 1, starts, rows), 0, total_rows
    first, last = mine[0], mine[-1] + 1
    return _slice(batch, first, last, starts, rows), rows[last] - rows[first], total_rows


def broadcast_parameters(ctx: Context, params) -> None:
    """Rank 0's values of `params` on every rank. The trainer's own LoRA init is seeded and
    equal everywhere; a model handed in with adapters initialised per process might not be."""
    if ctx.distributed:
        import torch.distributed as dist

        device = ctx.device()  # the process group's (NCCL takes CUDA tensors only)
        with torch.no_grad():
            for p in params:
                if p.device == device:
                    dist.broadcast(p.data, src=0)
                else:  # a model still on the CPU, to be placed by FSDP
                    buffer = p.data.to(device)
                    dist.broadcast(buffer, src=0)
                    p.data.copy_(buffer)


def is_sharded(tensor) -> bool:
    """A DTensor (an FSDP2-sharded parameter or gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor) -> torch.Tensor:
    return tensor.to_local() if is_sharded(tensor) else tensor


def sync_gradients(ctx: Context, params) -> None:
    """Sum over ranks the gradients of the replicated (not FSDP-sharded) parameters.

    A parameter without a gradient on this rank but with one on another gets zeros, so every
    rank reduces the same buffers; one without a gradient on any rank keeps None, as in one
    process (AdamW then leaves it alone: no weight decay, no step)."""
    if not ctx.distributed:
        return
    replicated = [p for p in params if not is_sharded(p)]
    if not replicated:
        return
    present = torch.tensor([float(p.grad is not None) for p in replicated], device=replicated[0].device)
    replicated = [p for p, n in zip(replicated, ctx.all_reduce_sum(present).tolist()) if n > 0]
    for p in replicated:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list] = {}
    for p in replicated:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():  # one all-reduce per dtype: LoRA grads are small
        flat = torch.cat([g.reshape(-1) for g in grads])
        ctx.all_reduce_sum(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_sharded_grad_norm(ctx: Context, params, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a mix of FSDP-sharded and replicated parameters:
    the squared norms of the local shards are summed over ranks, the replicated ones
    (identical on every rank after `sync_gradients`) are counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    device = _local(grads[0]).device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        square = _local(g).float().pow(2).sum()
        if is_sharded(g):
            sharded += square
        else:
            replicated += square
    total = (ctx.all_reduce_sum(sharded) + replicated).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip formula
    for g in grads:
        _local(g).mul_(coef.to(g.dtype))
    return total
