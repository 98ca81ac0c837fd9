"""The viommu backend of a Machine, supervised behind one interface whichever way it runs.

- ChildBackend: `python -m viommu.backend` in a process of its own (the default: it cannot
  share our GIL or our crashes). We bind its two listening sockets and hand them over, so QEMU
  starts and connects while the backend is still starting: its start-up overlaps QEMU's.
- ThreadBackend: Backend.start_in_thread() in this process (handy under a debugger); the
  backend's loggers write backend.log.
- DetachedBackend: the backend process of a detached VM (`viommu up`), found again from
  state.json by another process. Such a backend runs under a watcher
  (viommu.vm.backend_watch), its parent, which records how it ended (backend-exit.json):
  `why_gone()` says it.

The Machine talks to each over its control socket (QMP); this is only their lifecycle.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from viommu.backend.backend import Backend
from viommu.device.config import DeviceConfig
from viommu.transport.sockets import listen_private_unix
from viommu.vm import backend_watch
from viommu.vm.errors import BackendLaunchError, log_tail
from viommu.vm.processes import PidProcess, Supervised, end_process

WATCHER_START_S = 30.0  # for the watcher to start the backend and say its pid

THREAD_NAME = "viommu-backend"  # what Backend.start_in_thread() names its thread
# The layers an in-process backend logs from (each module logs as its own name).
BACKEND_LOGGERS = ("viommu.backend", "viommu.transport", "viommu.device", "viommu.events",
                   "viommu.dataplane", "viommu.endpoints")


class BackendSupervisor(Protocol):
    @property
    def pid(self) -> int | None:
        """Its process's pid; None when it runs in this process."""

    def start(self) -> None:
        """Start it; BackendLaunchError when it cannot be started."""

    def alive(self) -> bool:
        """Whether it runs (False before start() and after it ended)."""

    def exit_status(self, timeout: float = 0) -> int | None:
        """Wait up to `timeout` for it to end: its exit status, or None (still running, or
        there is no status to have: a thread)."""

    def stop(self, timeout: float) -> None:
        """End it: it gets `timeout` seconds to leave by itself (it does once QEMU has gone),
        then it is made to."""


def supervisor(*, in_process: bool, vhost_socket: str, control_socket: str,
               endpoint_ids: Sequence[int], log_path: Path, detached: bool,
               msi_window: tuple[int, int], extra_args: Sequence[str] = ()
               ) -> BackendSupervisor:
    """A backend to start: in a thread of this process, or in a process of its own (in a
    session of its own, to outlive this process, when `detached`). `msi_window`: the MSI
    doorbell range of the platform, which PROBE reports as reserved. `extra_args`: more
    `viommu backend` arguments (a process of its own only), e.g. ["--null-device"]."""
    if in_process:
        if extra_args:
            raise ValueError(f"backend arguments {list(extra_args)} need a backend process "
                             "(not backend_in_process)")
        return ThreadBackend(vhost_socket, control_socket, endpoint_ids, log_path, msi_window)
    return ChildBackend(vhost_socket, control_socket, endpoint_ids, log_path, msi_window,
                        new_session=detached, extra_args=extra_args)


class _ProcessBackend(Supervised):
    """Supervision common to a backend process, whoever started it."""

    log_path: Path
    exit_record: Path | None = None  # a detached backend's watcher writes how it ended here

    def alive(self) -> bool:
        return self.running()

    def stop(self, timeout: float) -> None:
        if self.proc is not None:
            end_process(self.proc, "the viommu backend", timeout)

    def exit_status(self, timeout: float = 0) -> int | None:
        status = super().exit_status(timeout)
        record = self._record(wait=0.5 if status is not None else 0)
        return record["status"] if record is not None else status

    def why_gone(self) -> str:
        """How it ended, for a message: what its watcher recorded (or the exit status, if
        it was our child); unless a signal ended it, the last line of backend.log too."""
        record = self._record(wait=backend_watch.RECORD_WAIT)
        if record is not None:
            status = record["status"]
            how = f"{record['how']} at {time.strftime('%H:%M:%S', time.localtime(record['time']))}"
        elif isinstance(self.proc, subprocess.Popen) and self.proc.poll() is not None:
            status = self.proc.returncode
            how = backend_watch.describe(status)
        else:
            status, how = None, "how, nobody recorded"
        last = log_tail(self.log_path, 1) if status is None or status >= 0 else ""
        return f"{how}{f'; its log ends: {last}' if last else ''}"

    def _record(self, wait: float) -> dict | None:
        """The watcher's record; it writes it just after the backend is gone."""
        if self.exit_record is None:
            return None
        return backend_watch.read_record(str(self.exit_record), wait)


class ChildBackend(_ProcessBackend):
    def __init__(self, vhost_socket: str, control_socket: str, endpoint_ids: Sequence[int],
                 log_path: Path, msi_window: tuple[int, int], *,
                 new_session: bool = False, extra_args: Sequence[str] = ()) -> None:
        """`new_session`: a session of its own, so it outlives this process (`viommu up`)."""
        self.extra_args = list(extra_args)
        self.vhost_socket = vhost_socket
        self.control_socket = control_socket
        self.endpoint_ids = list(endpoint_ids)
        self.log_path = log_path
        self.msi_window = msi_window
        self.new_session = new_session

    def command(self, vhost_fd: int, control_fd: int) -> list[str]:
        cmd = [sys.executable, "-m", "viommu.backend", "--socket", self.vhost_socket,
               "--control", self.control_socket, "--socket-fd", str(vhost_fd),
               "--control-fd", str(control_fd),
               "--msi-window", "{:#x}-{:#x}".format(*self.msi_window)]
        for endpoint in self.endpoint_ids:
            cmd += ["--endpoint", str(endpoint)]
        return cmd + self.extra_args

    def start(self) -> None:
        listeners = []
        try:
            for path in (self.vhost_socket, self.control_socket):
                listeners.append(listen_private_unix(path))
            fds = [sock.fileno() for sock in listeners]
            with open(self.log_path, "ab") as out:
                if self.new_session:
                    self._start_watched(self.command(*fds), fds, out)
                else:
                    self.proc = subprocess.Popen(
                        self.command(*fds), stdout=out, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, pass_fds=fds)
        except OSError as exc:
            raise BackendLaunchError(f"could not be started: {exc}", exit_status=None,
                                     log_path=self.log_path) from exc
        finally:  # the child has its copies; QEMU connects to those
            for sock in listeners:
                sock.close()

    def _start_watched(self, command: list[str], fds: list[int], out: object) -> None:
        """In a session of its own, under a watcher that records how it ends (its parent:
        this process is about to exit)."""
        self.exit_record = self.log_path.with_name(backend_watch.EXIT_RECORD)
        self.exit_record.unlink(missing_ok=True)
        reader, writer = os.pipe()
        try:
            watch = [sys.executable, "-m", "viommu.vm.backend_watch", "--record",
                     str(self.exit_record), "--pid-fd", str(writer),
                     *(f"--pass-fd={fd}" for fd in fds), "--", *command]
            subprocess.Popen(watch, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, pass_fds=[*fds, writer],
                             start_new_session=True)
            os.close(writer)
            writer = -1
            said = _read_line(reader, WATCHER_START_S)
        finally:
            os.close(reader)
            if writer >= 0:
                os.close(writer)
        if not said.isdigit():
            raise OSError(f"its watcher did not start it ({said or 'no word from it'})")
        # Its command line names the control socket: a reused pid is not taken for it.
        self.proc = PidProcess(int(said), self.control_socket)


def _read_line(fd: int, timeout: float) -> str:
    """One line from a pipe, or what came before EOF or `timeout`."""
    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


class DetachedBackend(_ProcessBackend):
    """Another process started it (`viommu up`); this one only watches and stops it."""

    def __init__(self, pid: int, control_socket: str, workdir: Path) -> None:
        # Its command line names the control socket: a reused pid is not taken for it.
        self.proc = PidProcess(pid, control_socket)
        self.log_path = workdir / "backend.log"
        self.exit_record = workdir / backend_watch.EXIT_RECORD

    def start(self) -> None:
        """Nothing to start: it runs already, or it is gone (then `alive()` says so)."""


class ThreadBackend:
    pid = None  # it runs in this process

    def __init__(self, vhost_socket: str, control_socket: str, endpoint_ids: Sequence[int],
                 log_path: Path, msi_window: tuple[int, int]) -> None:
        self.backend = Backend(vhost_socket, control_socket, list(endpoint_ids),
                               DeviceConfig(resv_msi=msi_window))
        self.log_path = log_path
        self._handler: logging.Handler | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._log_to_file()
        before = set(threading.enumerate())
        try:
            self.backend.start_in_thread()  # returns once both sockets listen
        except RuntimeError as exc:
            raise BackendLaunchError(str(exc), exit_status=None, log_path=self.log_path) from exc
        # The thread its loop runs on is the one start_in_thread() started.
        self._threads = [t for t in threading.enumerate()
                         if t not in before and t.name == THREAD_NAME]

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def exit_status(self, timeout: float = 0) -> int | None:
        return None

    def stop(self, timeout: float) -> None:
        self.backend.stop()
        self.backend.join(timeout)
        if self._handler is not None:
            for name in BACKEND_LOGGERS:
                logging.getLogger(name).removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def _log_to_file(self) -> None:
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        for name in BACKEND_LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
        self._handler = handler
