"""A Machine's QEMU: its process and the two sockets we reach it by, the serial console and
the QMP monitor. As our child its monitor connects to our QMP server; detached (`viommu up`)
it listens for whoever attaches, and another process finds it again by pid (`adopt`)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from viommu.vm.console import Console
from viommu.vm.errors import QMP_ERRORS, MachineError
from viommu.vm.processes import PidProcess, Supervised, end_process
from viommu.vm.qmp import QmpChannel

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 30.0  # for QEMU to create its sockets and to connect QMP


class QemuProcess(Supervised):
    def __init__(self, *, name: str, serial_socket: str, qmp_socket: str, log_path: Path,
                 console_log: Path, detached: bool) -> None:
        """`console_log`: where we log the console (QEMU logs it itself when detached)."""
        self.name = name
        self.serial_socket = serial_socket
        self.log_path = log_path
        self.console_log = console_log
        self.detached = detached
        self.qmp = QmpChannel(qmp_socket, "QEMU")
        self.command: list[str] = []
        self.console: Console | None = None

    def adopt(self, pid: int) -> None:
        """The detached QEMU with this pid; its console and QMP are connected on first use."""
        self.proc = PidProcess(pid, self.qmp.path)  # its command line names the QMP socket
        self.qmp.lazy = True

    # --- start-up ------------------------------------------------------------------------------

    def start(self, command: Sequence[str], pass_fds: Sequence[int] = ()) -> None:
        """Start it (OSError when it cannot be); when it is our child our QMP server listens
        first, as its monitor connects to it."""
        self.command = list(command)
        if not self.detached:
            self.qmp.listen()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, pass_fds=tuple(pass_fds),
                                         start_new_session=self.detached)

    def connect(self) -> None:
        """The console first: QEMU waits for it (wait=on) before it goes on, so no output is
        lost. Then QMP. OSError or a QMP error when QEMU does not get that far."""
        self._wait_for_socket(self.serial_socket)
        self._once_listening(self.open_console)
        if self.detached:
            self._wait_for_socket(self.qmp.path)
            self._once_listening(self.qmp.connect)
        else:
            self.qmp.accept(timeout=SOCKET_TIMEOUT_S)

    def serial_in_use(self) -> bool:
        """Whether another client holds the serial console (it takes one at a time; a
        second one waits, unaccepted, until the first leaves): QEMU's query-chardev calls a
        socket chardev with nobody connected `disconnected:...` (chardev/char-socket.c)."""
        try:
            chardevs = self.qmp.execute("query-chardev", {})
        except (MachineError, *QMP_ERRORS):
            return False  # QMP busy too: nothing to tell by
        return any(c["label"] == "serial" and not c["filename"].startswith("disconnected:")
                   for c in chardevs)

    def open_console(self) -> Console:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.serial_socket)
        except OSError:
            sock.close()
            raise
        # A detached QEMU writes console.log itself (logfile=): do not write it twice.
        self.console = Console(sock, Path(os.devnull) if self.detached else self.console_log)
        return self.console

    def _wait_for_socket(self, path: str) -> None:
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                raise ChildProcessError(f"QEMU exited before it created {path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU did not create {path} within {SOCKET_TIMEOUT_S:g} s")
            time.sleep(0.02)

    def _once_listening(self, connect: Callable[[], object]) -> None:
        """QEMU creates a socket's file (bind) just before it listens on it: a connection in
        between is refused (seen on a loaded host), so try again while QEMU runs."""
        deadline = time.monotonic() + SOCKET_TIMEOUT_S
        while True:
            try:
                connect()
                return
            except (ConnectionRefusedError, MachineError) as exc:
                if not _refused(exc) or self.proc.poll() is not None \
                        or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    # --- the end ---------------------------------------------------------------------------------

    def quit(self, timeout: float) -> None:
        """QMP quit; SIGTERM when it has not exited within `timeout` seconds, then SIGKILL."""
        try:
            self.qmp.execute("quit", {})
        except (MachineError, *QMP_ERRORS) as exc:
            log.info("%s: QMP quit failed (%s)", self.name, exc)
            timeout = min(timeout, 1.0)  # nothing asked it to exit: on to the signals
        end_process(self.proc, f"{self.name}'s QEMU", timeout)

    def close(self) -> None:
        """Close our connections to it (QMP, console); QEMU itself is left alone."""
        self.qmp.close()
        if self.console is not None:
            self.console.close()
            self.console = None


def _refused(exc: BaseException | None) -> bool:
    """Whether a connection refused is what failed (under the QMP client's own errors)."""
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__
    return False
