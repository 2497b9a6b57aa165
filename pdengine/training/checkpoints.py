"""Training checkpoints without pickle (docs/DESIGN.md, "Checkpoints and resume").

`OUT/checkpoints/step-NNNNNNN.safetensors` is one safetensors file: every tensor (the
adapter, the optimizer's moments and step counts, the torch and CUDA RNG states) is a
tensor entry, and everything else (step, data position, scheduler and optimizer
hyper-parameters, Python's RNG state) is JSON in the file's metadata. Loading it can
never run code, unlike `torch.load` of a pickle: a `step-*.pt` (or any file that is
not this format) is refused, not read. Writes are atomic (temp file, fsync, rename).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pdengine.errors import InputError
from pdengine.io import atomic_write_bytes

FORMAT = "pdengine-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d{7})\.(safetensors|dcp)$")  # .dcp: an FSDP run's DCP directory


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out: Path, step: int, suffix: str = "safetensors") -> Path:
    return checkpoint_dir(out) / f"step-{step:07d}.{suffix}"


def is_sharded_checkpoint(path: Path) -> bool:
    """An FSDP run's checkpoint (a torch.distributed.checkpoint directory)."""
    return Path(path).suffix == ".dcp"


def remove_path(path: Path) -> None:
    if Path(path).is_dir():
        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def prune_checkpoints(out: Path, keep: int) -> None:
    for old in list_checkpoints(out)[:-keep]:
        remove_path(old)


def list_checkpoints(out: Path) -> list[Path]:
    """Our checkpoints, oldest first; InputError for a `step-*` file that is not one."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("step-*")):
        if not _NAME.match(path.name):
            raise InputError(f"{path} is not a pdengine checkpoint (checkpoints are step-NNNNNNN.safetensors, "
                             "or step-NNNNNNN.dcp directories with --fsdp; "
                             "pickle files are never loaded, they can run code): remove it to resume")
        found.append(path)
    return found


def latest_checkpoint(out: Path) -> Path | None:
    files = list_checkpoints(out)
    return files[-1] if files else None


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Temp files of atomic writes killed half-way (`.step-*.tmp`, `.run.json.*.tmp`, the adapter's).
    Safe only under the directory's lock: no other writer can own them."""
    stale = [*checkpoint_dir(out).glob(".step-*.tmp"), *Path(out).glob(".*.tmp"),
             *(Path(out) / "adapter").glob(".*.tmp")]
    for path in stale:  # an FSDP checkpoint's temp is a directory
        remove_path(path)
    return stale


# ------------------------------------------------------------------ state <-> tensors + JSON


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    version, internal, gauss = random.getstate()
    return tensors, {"version": version, "internal": list(internal), "gauss": gauss}


def _set_rng_state(tensors: dict, python: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[f"rng/cuda/{i}"] for i in range(len(tensors)) if f"rng/cuda/{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))


def _optimizer_state(optimizer) -> tuple[dict, dict]:
    """AdamW's state_dict split: tensors by `optimizer/<param>/<key>`, the rest JSON."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _optimizer_state_dict(tensors: dict, saved: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entry in saved["plain"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": saved["param_groups"]}


# ------------------------------------------------------------------ save / load


def save_checkpoint(out: Path, step: int, params: dict, optimizer, scheduler, position: dict,
                    keep: int, world_size: int = 1) -> Path:
    """Write step `step`'s checkpoint atomically and keep the newest `keep`.
    world_size: the ranks that trained it (a resume with another number is checked)."""
    rng_tensors, python_rng = _rng_state()
    opt_tensors, opt_json = _optimizer_state(optimizer)
    tensors = {**{f"adapter/{n}": p.detach() for n, p in params.items()}, **opt_tensors, **rng_tensors}
    meta = {"step": step, "position": position, "scheduler": scheduler.state_dict(), "optimizer": opt_json,
            "python_rng": python_rng, "world_size": world_size}
    data = save_safetensors({k: v.cpu().contiguous() for k, v in tensors.items()},
                            metadata={"format": FORMAT, "version": str(VERSION), "state": json.dumps(meta)})
    path = checkpoint_path(out, step)
    atomic_write_bytes(path, data)
    prune_checkpoints(out, keep)
    return path


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors, JSON state) of a checkpoint; InputError when it is damaged or not ours."""
    data = Path(path).read_bytes()
    try:
        tensors = load_safetensors(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is truncated or not a pdengine checkpoint ({e}); "
                         "remove it to resume from the one before") from None
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION) or "state" not in meta:
        raise InputError(f"{path} is not a pdengine checkpoint (format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r})")
    try:
        return tensors, json.loads(meta["state"])
    except ValueError as e:
        raise InputError(f"{path}: its metadata is damaged ({e}); remove it to resume from the one before") from None


def _metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file (8-byte header length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size].decode("utf-8"))
    return header.get("__metadata__") or {}


def load_checkpoint(path: Path, params: dict, optimizer, scheduler) -> dict:
    """Restore adapter, optimizer, scheduler and RNG states; returns the JSON state
    (step, position)."""
    return apply_checkpoint(path, *read_checkpoint(path), params, optimizer, scheduler)


def apply_checkpoint(path: Path, tensors: dict, state: dict, params: dict, optimizer, scheduler) -> dict:
    """`load_checkpoint` of what `read_checkpoint(path)` returned (read once, e.g. by rank 0
    and broadcast to the others)."""
    adapter = {n[len("adapter/"):]: t for n, t in tensors.items() if n.startswith("adapter/")}
    missing = sorted(set(params) - set(adapter))
    if missing:
        raise InputError(f"checkpoint {path} does not match the model's adapters (missing {missing[:3]}...)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(adapter[name])
    optimizer.load_state_dict(_optimizer_state_dict(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(tensors, state["python_rng"])
    return state
