"""The demo's stage log: one line when a stage starts and one when it ends, with its wall
time, its CPU time and the time elapsed since the demo began; a stage made of parts that
run side by side (the trainings) logs one line per part as it finishes (`record`).

Why both clocks: on a shared, loaded machine the wall time says how busy the machine was,
the CPU time what the stage itself cost; a quiet machine's wall time lies between
CPU time / threads and CPU time. The CPU clock is this process's (all its threads) plus
its finished child processes' (`resource.RUSAGE_CHILDREN`), so the training workers'
CPU counts in their stage and in the total once they are reaped.
"""
from __future__ import annotations

import resource
import time


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def cpu_clock() -> float:
    """CPU seconds of this process and of its reaped children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Stages:
    """Runs named stages, logging each; `seconds` (wall) and `cpu_seconds` per stage name."""

    def __init__(self, log, total: int | None = None):
        self.log = log
        self.total = total  # the number of stages planned, for "[3/12]" in the log
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._started = 0
        self._wall0 = time.perf_counter()
        self._cpu0 = cpu_clock()

    def _counter(self) -> str:
        self._started += 1
        return f"{self._started}/{self.total}" if self.total else str(self._started)

    def run(self, name: str, fn, *args, note: str | None = None, **kwargs):
        """`fn(*args, **kwargs)`, timed and logged as stage `name` (`note`: said on its start
        line); returns its result."""
        counter = self._counter()
        self.log(f"[demo {_clock(self.elapsed())}] {counter} {name} ..." + (f" {note}" if note else ""))
        wall, cpu = time.perf_counter(), cpu_clock()
        out = fn(*args, **kwargs)
        self._store(name, time.perf_counter() - wall, cpu_clock() - cpu)
        self.log(f"[demo {_clock(self.elapsed())}] {counter} {name}: {self.seconds[name]:.1f} s "
                 f"(cpu {self.cpu_seconds[name]:.1f} s)")
        return out

    def record(self, name: str, wall: float, cpu: float, note: str | None = None) -> None:
        """A part of the running stage finished (timed where it ran): one log line, and its
        own entry in `seconds` / `cpu_seconds`."""
        self._store(name, wall, cpu)
        self.log(f"[demo {_clock(self.elapsed())}]   {name}: {self.seconds[name]:.1f} s "
                 f"(cpu {self.cpu_seconds[name]:.1f} s" + (f", {note})" if note else ")"))

    def _store(self, name: str, wall: float, cpu: float) -> None:
        self.seconds[name] = round(wall, 2)
        self.cpu_seconds[name] = round(cpu, 2)

    def elapsed(self) -> float:
        return time.perf_counter() - self._wall0

    def finish(self) -> None:
        """Record the totals (`total` in both dicts)."""
        self.seconds["total"] = round(self.elapsed(), 2)
        self.cpu_seconds["total"] = round(cpu_clock() - self._cpu0, 2)
