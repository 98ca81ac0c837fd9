"""The processes a Machine runs (QEMU, the backend): ended politely, then firmly; and, for a
detached VM, found again by pid from another process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

TERM_TIMEOUT_S = 5.0


class Process(Protocol):
    """What a Machine uses of a process: subprocess.Popen's, or PidProcess's."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Supervised:
    """What watches one process (`proc`; None until it is started or found)."""

    proc: Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_status(self, timeout: float = 0) -> int | None:
        """Its exit status once it has exited, waiting up to `timeout`; None if it runs."""
        return exit_status(self.proc, timeout) if self.proc is not None else None


def process_alive(pid: int, token: str) -> bool:
    """Whether `pid` runs a command line containing `token` (one of its socket paths): a
    pid reused by an unrelated process, or a zombie (empty command line), is not ours."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return token.encode() in cmdline


class PidProcess:
    """A VM's QEMU or backend found again from state.json: the part of subprocess.Popen that
    Machine uses. It is not our child, so its exit status is unknown and reported as 0."""

    def __init__(self, pid: int, token: str) -> None:
        self.pid = pid
        self.token = token
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not process_alive(self.pid, self.token):
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.poll() is not None:
            return
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:  # it exited between the check and the signal
            self.returncode = 0


def exit_status(proc: Process, timeout: float) -> int | None:
    """Its exit status once it has exited, waiting up to `timeout`; None if it runs on."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def exited_within(proc: Process, timeout: float) -> bool:
    return exit_status(proc, timeout) is not None


def end_process(proc: Process, what: str, timeout: float) -> None:
    """Give it `timeout` seconds to exit by itself, then SIGTERM, then SIGKILL."""
    if exited_within(proc, timeout):
        return
    log.warning("%s (pid %d) did not exit within %g s: sending SIGTERM", what, proc.pid,
                timeout)
    proc.terminate()
    if exited_within(proc, TERM_TIMEOUT_S):
        return
    log.warning("%s (pid %d) did not exit on SIGTERM: sending SIGKILL", what, proc.pid)
    proc.kill()
    proc.wait()
