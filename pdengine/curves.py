"""Training curves: OUT/metrics.jsonl as a PNG a user can read at a glance.

`plot_training_curves(run_dir)` writes `run_dir/training_curves.png`: the loss per
optimizer step (and, when the trainer logs them, the main and replay losses and the
validation loss), next to the learning rate. A run with no step yet gives a figure that
says so instead of empty axes. The trainer writes one JSON line per optimizer step
(`pdengine/training/loop.py`: step, loss, lr, grad_norm, tokens, ...); any other numeric
key ending in `_loss` (main_loss, replay_loss, val_loss) is drawn on the loss panel, and
a line may carry only some keys (a validation line every N steps). See docs/DESIGN.md,
"Training".
"""
from __future__ import annotations

import json
import math
import sys
from datetime import date
from pathlib import Path

from pdengine.errors import InputError

METRICS_FILE = "metrics.jsonl"
OUTPUT_FILE = "training_curves.png"
# Loss series in drawing order, with their legend labels; other `*_loss` keys follow.
LOSS_LABELS = {"loss": "loss (step mean)", "main_loss": "main (QA) loss", "replay_loss": "replay loss",
               "val_loss": "validation loss"}


def read_metrics(path) -> list[dict]:
    """The metric lines of a metrics.jsonl. A partial last line (a run killed mid-write)
    is skipped; a damaged line elsewhere is an InputError naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut off
                continue
            raise InputError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            raise InputError(f"{path}:{number}: a metrics line needs a numeric 'step'")
        rows.append(row)
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_series(rows) -> dict[str, list[tuple[float, float]]]:
    """{key: [(step, value), ...]} for the loss keys (LOSS_LABELS first) and `lr`, each
    from the lines that carry a finite number for it, in step order."""
    keys = [k for k in LOSS_LABELS if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.endswith("_loss") and k not in LOSS_LABELS})
    keys += ["lr"] if any("lr" in r for r in rows) else []
    series = {}
    for key in keys:
        points = sorted((float(r["step"]), float(r[key])) for r in rows if _is_number(r.get(key)))
        if points:
            series[key] = points
    return series


def _title(run_dir: Path | None, n_steps: int) -> str:
    """'training: <model>, <loss>, N steps, <date>' from run.json when there is one."""
    parts = []
    run_file = run_dir / "run.json" if run_dir is not None else None
    if run_file is not None and run_file.is_file():
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
            model, loss = run.get("model"), (run.get("config") or {}).get("loss")
            # The last two path parts: "runs/demo/model" says more than "model".
            parts += ["/".join(Path(str(model)).parts[-2:])] if model else []
            parts += [f"loss={loss}"] if loss else []
        except (ValueError, UnicodeDecodeError, AttributeError):
            pass  # a title is no reason to fail; run.json is checked where it matters
    parts += [f"{n_steps} steps", date.today().isoformat()]
    return "training: " + ", ".join(parts)


def training_figure(rows, title: str = "training"):
    """The matplotlib Figure: losses (left) and learning rate (right), or an empty state."""
    # The Agg canvas directly, not pyplot: no display needed, no global backend switched
    # under a user's notebook, no figure left open in pyplot's registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = curve_series(rows)
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    losses = {k: v for k, v in series.items() if k != "lr"}
    if not losses and "lr" not in series:
        ax = figure.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no training step recorded yet\n(metrics.jsonl is empty or missing)",
                ha="center", va="center", fontsize=14)
        figure.suptitle(title)
        return figure
    loss_ax, lr_ax = figure.subplots(1, 2)
    for key, points in losses.items():
        steps, values = zip(*points)
        style = {"marker": "o", "linestyle": "--"} if key == "val_loss" else {}
        loss_ax.plot(steps, values, label=LOSS_LABELS.get(key, key), **style)
    _finish(loss_ax, "loss", losses, legend=True)
    if "lr" in series:
        steps, values = zip(*series["lr"])
        lr_ax.plot(steps, values, color="tab:gray")
    _finish(lr_ax, "learning rate", {"lr": series.get("lr", [])}, legend=False, log_ok=False)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _finish(ax, ylabel: str, series: dict, legend: bool, log_ok: bool = True) -> None:
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not any(series.values()):
        ax.text(0.5, 0.5, f"no {ylabel} logged", ha="center", va="center", transform=ax.transAxes)
    elif legend:
        ax.legend()
    values = [v for points in series.values() for _, v in points]
    # A loss falling over orders of magnitude reads better on a log scale (the learning
    # rate's warmup from ~0 would not).
    if log_ok and values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_yscale("log")


def plot_training_curves(source, out=None) -> Path:
    """Write the curves of a training run to a PNG; returns its path.

    source: the run directory (OUT of `pdengine train`) or its metrics.jsonl. out: the PNG
    (default: training_curves.png next to metrics.jsonl). A run directory without a
    metrics.jsonl (no step finished yet) gives the empty-state figure."""
    source = Path(source)
    if source.is_dir():
        run_dir, metrics = source, source / METRICS_FILE
    elif source.is_file():
        run_dir, metrics = source.parent, source
    else:
        raise InputError(f"{source}: no such training run directory or metrics file")
    rows = read_metrics(metrics) if metrics.is_file() else []
    out = Path(out) if out is not None else run_dir / OUTPUT_FILE
    figure = training_figure(rows, _title(run_dir, len({r["step"] for r in rows if "loss" in r})))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial.png")
    figure.savefig(partial)
    partial.replace(out)  # a reader never sees half a PNG
    return out


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """Options of `pdengine curves` (also `python -m pdengine.curves`)."""
    parser.add_argument("run", help="a training run directory (pdengine train --out) or its metrics.jsonl")
    parser.add_argument("--out", default=None, help=f"the PNG (default: RUN/{OUTPUT_FILE})")


def run(args) -> int:
    """`pdengine curves RUN [--out PNG]`."""
    print(f"wrote {plot_training_curves(args.run, args.out)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pdengine.curves", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        parser.exit(2, f"pdengine: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["plot_training_curves", "training_figure", "curve_series", "read_metrics", "add_arguments", "run"]
