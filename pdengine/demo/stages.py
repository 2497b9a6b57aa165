"""The demo's stage log: one line when a stage starts and one when it ends, with its wall
time, its CPU time and the time elapsed since the demo began.

Why both clocks: on a shared, loaded machine the wall time says how busy the machine was,
the CPU time (this process, all its threads: `time.process_time`) what the stage itself
cost; a quiet machine's wall time lies between CPU time / threads and CPU time.
"""
from __future__ import annotations

import time


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


class Stages:
    """Runs named stages, logging each; `seconds` (wall) and `cpu_seconds` per stage name."""

    def __init__(self, log, total: int | None = None):
        self.log = log
        self.total = total  # the number of stages planned, for "[3/12]" in the log
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()

    def _counter(self) -> str:
        done = len(self.seconds) + 1
        return f"{done}/{self.total}" if self.total else str(done)

    def run(self, name: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, timed and logged as stage `name`; returns its result."""
        counter = self._counter()
        self.log(f"[demo {_clock(self.elapsed())}] {counter} {name} ...")
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - wall, 2)
        self.cpu_seconds[name] = round(time.process_time() - cpu, 2)
        self.log(f"[demo {_clock(self.elapsed())}] {counter} {name}: {self.seconds[name]:.1f} s "
                 f"(cpu {self.cpu_seconds[name]:.1f} s)")
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self._wall0

    def finish(self) -> None:
        """Record the totals (`total` in both dicts)."""
        self.seconds["total"] = round(self.elapsed(), 2)
        self.cpu_seconds["total"] = round(time.process_time() - self._cpu0, 2)
