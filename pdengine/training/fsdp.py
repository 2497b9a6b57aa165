"""FSDP2 for the trainer (`--fsdp` under torchrun): a frozen base sharded per decoder layer.

`shard_model` applies `torch.distributed.fsdp.fully_shard` to every decoder layer and then
to the decoder body (embeddings and final norm), the base frozen and the LoRA parameters
trainable inside the same groups (FSDP2 allows mixed requires_grad). The lm_head stays a
plain replicated module: the fused loss reads its weight directly, outside any module
forward, so FSDP's unshard hooks would never run for it; it is frozen (an lm_head adapter,
when asked for, is summed over ranks like DDP's gradients, `parallel.sync_gradients`).
Gradients are *summed* over ranks (divide factor 1): each rank's loss is already
normalized by the global count of answer tokens (`pdengine.training.parallel`).

Checkpoints are `torch.distributed.checkpoint` directories (`OUT/checkpoints/step-N.dcp/`,
every rank writing its shards; OUT must be on a filesystem all ranks share) holding the
LoRA parameters and the optimizer state only (frozen parameters are left out), plus a
`state.json` that rank 0 writes (step, data position, scheduler, RNG). DCP reshards on
load, so a resume may use another number of ranks. The final adapter is gathered to full
tensors and rank 0 writes the same PEFT files a one-process run writes.

A quantized base (bitsandbytes NF4/int8, `--quantize`) is refused: its packed
`Params4bit` / `Int8Params` weights carry their quantization state (absmax, quant map) as
attributes outside the tensor; fully_shard replaces them by plain DTensor parameters, and
the first forward fails ("'Parameter' object has no attribute 'quant_state'", checked with
torch 2.13 and bitsandbytes on CPU). DDP (without --fsdp) trains on an NF4 base.
"""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import torch

from pdengine import modeling
from pdengine.errors import InputError
from pdengine.training.parallel import is_sharded

STATE_FILE = "state.json"
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


def refuse_quantized(model) -> None:
    kinds = sorted({type(p).__name__ for p in model.parameters() if type(p).__name__ in _QUANTIZED_PARAMS})
    if kinds:
        raise InputError(quantized_refusal(", ".join(kinds)))


def quantized_refusal(kinds: str = "bitsandbytes") -> str:
    return (f"--fsdp cannot shard a quantized base ({kinds} weights keep their quantization state outside "
            "the tensor; FSDP2 shards them as plain tensors and loses it); train the quantized base without "
            "--fsdp (DDP: the base is replicated, only LoRA gradients are summed)")


def decoder_layers(model) -> list:
    body = modeling.model_body(model)
    layers = getattr(body, "layers", None)
    if layers is None or len(layers) == 0:
        raise InputError(f"--fsdp: {type(body).__name__} has no `layers` list of decoder layers to shard")
    return list(layers)


def shard_model(model, ctx, bf16: bool) -> None:
    """fully_shard every decoder layer, then the body; gradients summed over ranks.

    The mesh is on this rank's device (`ctx.device()`, the process group's): fully_shard moves
    a module loaded on the CPU there as it shards it, one layer at a time, and the replicated
    lm_head is moved after. So a base loaded on the CPU (`pdengine train --fsdp` does:
    loading's keep_on_cpu) never sits whole on one GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    refuse_quantized(model)
    device = ctx.device()
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    sharded = []
    for layer in decoder_layers(model):
        sharded.append(fully_shard(layer, mesh=mesh, mp_policy=policy))
    sharded.append(fully_shard(modeling.model_body(model), mesh=mesh, mp_policy=policy))
    modeling.output_layer(model).to(device)
    for module in sharded:
        module.set_gradient_divide_factor(1.0)
        # A plain SUM: gloo has neither PREMUL_SUM (what factor 1 would use) nor AVG.
        module.set_force_sum_reduction_for_comms(True)


def trainable(model) -> dict:
    """The LoRA parameters after sharding (new DTensor parameters replace the old ones)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ checkpoints (DCP)


def _options():
    """LoRA parameters only (frozen ones left out, so loading must not be strict about them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _rng() -> dict:
    state = torch.get_rng_state().numpy().tobytes()
    return {"torch": base64.b64encode(state).decode("ascii")}


def save(ctx, folder: Path, final: Path, model, optimizer, meta: dict) -> Path:
    """Every rank writes its shards to `folder` (a temp name); rank 0 adds state.json and
    renames it to `final` once every rank has written. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if ctx.broadcast(final.exists() if ctx.is_main else None):
        # this step is saved already (a run's end saves its last step, which save_every may
        # have saved): the same state; never delete the only checkpoint to rewrite it
        return final
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    if ctx.is_main and folder.exists():
        shutil.rmtree(folder)
    ctx.barrier()
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    ctx.barrier()
    if ctx.is_main:
        (folder / STATE_FILE).write_text(json.dumps({**meta, "rng": _rng()}))
        folder.rename(final)
    ctx.barrier()
    return final


def read_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder} is not a complete FSDP checkpoint ({path}: {e}); remove it to resume "
                         "from the one before") from None


def load(folder: Path, model, optimizer) -> dict:
    """Restore LoRA parameters and optimizer state (resharded to this job) and the RNG;
    returns state.json (step, position, scheduler, ...). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = read_state(folder)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=_options())
    rng = torch.frombuffer(bytearray(base64.b64decode(state["rng"]["torch"])), dtype=torch.uint8)
    torch.set_rng_state(rng.clone())
    return state


# ------------------------------------------------------------------ the final adapter


def save_adapter(ctx, model, path: Path) -> None:
    """The PEFT adapter of a sharded model: full tensors gathered (collective), rank 0 writes
    the same files `pdengine.save_adapter` writes for one process."""
    from pdengine import lora, peft_format

    tensors = {}
    for key, value in lora._peft_state_dict(model).items():  # the same keys, in the same order, on every rank
        full = value.full_tensor() if is_sharded(value) else value
        tensors[key] = full.detach().contiguous().cpu()
    if ctx.is_main:
        cfg = model.pdengine_lora_config
        base_name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        peft_format.write_adapter(path, peft_format.adapter_config(cfg, base_name), tensors)
    ctx.barrier()
