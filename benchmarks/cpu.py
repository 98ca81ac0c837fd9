"""CPU time of a process, to the nanosecond: the sum over its threads of the time the
scheduler ran them (the first field of /proc/<pid>/task/<tid>/schedstat, Linux
Documentation/scheduler/sched-stats.rst). /proc/<pid>/stat's utime and stime count clock
ticks (10 ms), too coarse for a few thousand requests.

A thread that ends between two samples takes its time with it; the threads measured here
(QEMU's vCPU, the backend's request thread and loop) live as long as the VM.
"""

from __future__ import annotations

import os


def threads_cpu_ns(pid: int) -> dict[int, int]:
    """{tid: ns the thread has run} of a live process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended while we looked
    return out


def process_cpu_ns(pid: int) -> int:
    return sum(threads_cpu_ns(pid).values())


class CpuMeter:
    """CPU seconds that processes spent between `__enter__` and `__exit__`."""

    def __init__(self, **pids: int | None) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._before = {name: process_cpu_ns(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = {name: (process_cpu_ns(pid) - self._before[name]) / 1e9
                        for name, pid in self.pids.items()}
