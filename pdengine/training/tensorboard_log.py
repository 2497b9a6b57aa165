"""Optional TensorBoard logging of a run (OUT/tensorboard): loss, learning rate, gradient
norm, throughput and val_loss per optimizer step, the same numbers as metrics.jsonl.

metrics.jsonl stays the record; TensorBoard is a viewer for it, so a missing `tensorboard`
package is no error and writes nothing (it is not a dependency of pdengine).
"""
from __future__ import annotations

from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss")


def _summary_writer_class():
    """torch's SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch imports tensorboard lazily here: absent, no logging
        return None
    return SummaryWriter


def open_writer(out: Path, enabled: bool):
    """A writer for OUT/tensorboard, or None (disabled, or tensorboard not installed)."""
    writer_class = _summary_writer_class() if enabled else None
    return None if writer_class is None else writer_class(log_dir=str(Path(out) / TENSORBOARD_DIR))


def log_row(writer, row: dict) -> None:
    """One metrics row as scalars under train/ at its step."""
    if writer is None:
        return
    for name in SCALARS:
        if row.get(name) is not None:
            writer.add_scalar(f"train/{name}", row[name], row["step"])
