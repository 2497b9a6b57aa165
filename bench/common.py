"""Shared benchmark utilities: timing, peak memory, environment tags, result files.

Bench scripts run as `python bench/NAME.py` (or `pdengine bench NAME`) and import this
module as `from common import ...`. Every bench script measures its baselines in the same
run and saves rows through `save_results`, which tags them with the device and library
versions: into a new git-ignored bench/runs/<timestamp>/ folder, or, with `--save`, into
the tracked bench/results/ that bench/RESULTS.md quotes.

Peak memory:
- CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the call.
- CPU: the rise of the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs) above its resident set before the call. It counts every
  allocation, C++ included, at page granularity; run a warm-up first so lazy
  initialisation is not charged to the measured call.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"  # tracked: the figures RESULTS.md quotes
# git-ignored: one folder per run (PDENGINE_BENCH_RUNS_DIR moves it, e.g. for tests)
RUNS_DIR = Path(os.environ.get("PDENGINE_BENCH_RUNS_DIR") or BENCH_DIR / "runs")

# One folder per process, so the files of one `pdengine bench NAME` run stay together.
_RUN_STAMP = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn, warmup: int = 2, reps: int = 5) -> dict:
    """Median and 20/80 % quantiles of fn's wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize_ms(times)


def summarize_ms(times: list[float]) -> dict:
    """Median, 20/80 % quantiles and extremes of a list of millisecond timings."""
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3],
            "min_ms": times[0], "max_ms": times[-1], "reps": len(times)}


def time_round_robin(fns: dict, warmup: int = 2, reps: int = 5) -> dict:
    """time_fn for several implementations whose repetitions take turns (A B C A B C ...),
    so that a slow stretch of a shared machine hits every implementation alike and the
    ratios within one run stay fair. Returns name -> time_fn's dict."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: summarize_ms(ts) for name, ts in times.items()}


def _proc_status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def peak_memory(fn) -> int:
    """Bytes of memory fn adds at its peak (see module docstring for the method)."""
    if torch.cuda.is_available():
        _sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync()
        return torch.cuda.max_memory_allocated() - base
    if not Path("/proc/self/clear_refs").exists():
        return -1  # not Linux: unknown
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _proc_status_bytes("VmRSS")
    fn()
    return _proc_status_bytes("VmHWM") - base


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment() -> dict:
    env = {
        "device": device_name(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def op_bench_parser(doc: str):
    """The flags every op microbenchmark takes: --shapes (gpu presets when CUDA is there),
    --reps, --warmup and --save."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--shapes", choices=("gpu", "cpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    add_save_flag(parser)
    return parser


def add_save_flag(parser) -> None:
    """`--save`: write into the tracked bench/results/ (else a git-ignored run folder)."""
    parser.add_argument("--save", action="store_true",
                        help="write the results into bench/results/ (tracked, quoted by RESULTS.md) "
                             "instead of a new bench/runs/<timestamp>/ folder")


def results_dir(save: bool) -> Path:
    """bench/results/ with --save; otherwise this process's bench/runs/<timestamp>/, so a
    plain run never overwrites the figures the checkout tracks."""
    return RESULTS_DIR if save else RUNS_DIR / _RUN_STAMP


def save_results(name: str, rows: list[dict], save: bool = False, extra_env: dict | None = None) -> Path:
    """Write <name>.json (rows + environment, plus extra_env) and <name>.csv into
    results_dir(save); returns the JSON path."""
    folder = results_dir(save)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**environment(), **(extra_env or {})}
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    keys = sorted({k for r in rows for k in r})
    with (folder / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", *keys])
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": env["device"], **r})
    return json_path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain aligned table on stdout."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
