"""The processes a Machine runs (QEMU, the backend): ended politely, then firmly; and, for a
detached VM, found again by pid from another process."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from typing import Protocol

import psutil

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


def find_process(pid: int, token: str) -> psutil.Process | None:
    """The live process `pid` if its command line contains `token` (one of its socket
    paths): a pid reused by an unrelated process, or a zombie, is not ours."""
    try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and token in "\0".join(proc.cmdline()):
            return proc
    except psutil.Error:  # gone, or not ours to look at
        pass
    return None


def process_alive(pid: int, token: str) -> bool:
    return find_process(pid, token) is not None


class PidProcess:
    """A VM's QEMU or backend found again from state.json: the part of subprocess.Popen that
    Machine uses, over psutil (which also tells a reused pid from the process it found). It
    is not our child, so its exit status is unknown and reported as 0."""

    def __init__(self, pid: int, token: str) -> None:
        self.pid = pid
        self._proc = find_process(pid, token)
        self.returncode: int | None = None if self._proc is not None else 0

    def poll(self) -> int | None:
        if self.returncode is None and not _running(self._proc):
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is None:
            try:
                self._proc.wait(timeout)
            except psutil.TimeoutExpired:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout) from None
            self.returncode = 0
        return self.returncode

    def terminate(self) -> None:
        self._signal(psutil.Process.terminate)

    def kill(self) -> None:
        self._signal(psutil.Process.kill)

    def _signal(self, send: Callable[[psutil.Process], None]) -> None:
        if self.poll() is not None:
            return
        try:
            send(self._proc)
        except psutil.NoSuchProcess:  # it exited between the check and the signal
            self.returncode = 0


def _running(proc: psutil.Process | None) -> bool:
    try:
        return proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
    log.info("%s (pid %d) did not exit within %g s: sending SIGTERM", what, proc.pid,
                timeout)
    proc.terminate()
    if exited_within(proc, TERM_TIMEOUT_S):
        return
    log.warning("%s (pid %d) did not exit on SIGTERM: sending SIGKILL", what, proc.pid)
    proc.kill()
    proc.wait()


def end_all(procs: list[psutil.Process], timeout: float = TERM_TIMEOUT_S) -> list[int]:
    """A second to leave by themselves (a backend's watcher leaves with it), then SIGTERM,
    then SIGKILL for those still there after `timeout`; the pids that had to be signalled."""
    _, procs = psutil.wait_procs(procs, timeout=1.0)
    signalled = [proc.pid for proc in procs]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        log.warning("pid %d did not exit on SIGTERM: sending SIGKILL", proc.pid)
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return signalled
