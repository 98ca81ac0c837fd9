"""What goes wrong starting, driving and stopping a Machine, as types.

After QEMU's python/qemu/machine (QEMUMachineError, VMLaunchFailure): a failed launch says
why without the reader opening a file: the command line, the exit status and the last lines
of the logs are in the exception and its message.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qemu.qmp import QMPError

if TYPE_CHECKING:
    from viommu.vm.backend_supervisor import BackendSupervisor
    from viommu.vm.qemu_process import QemuProcess

# What a QMP exchange or connection raises: the protocol's errors, the socket's, and EOFError
# when the peer hung up (qemu.qmp's AsyncProtocol.disconnect() re-raises what ended it).
QMP_ERRORS = (QMPError, OSError, EOFError)
TAIL_LINES = 20


class MachineError(RuntimeError):
    """A Machine could not do what was asked; the message says what to look at."""


class BackendLaunchError(MachineError):
    """The viommu backend did not start, or it died while the VM was starting."""

    def __init__(self, what: str, *, exit_status: int | None, log_path: Path) -> None:
        self.exit_status = exit_status
        self.log_path = log_path
        self.log_tail = log_tail(log_path)
        super().__init__(f"the viommu backend {what}; see {log_path}:\n{self.log_tail}")


class VMLaunchError(MachineError):
    """QEMU did not start, or it exited before the guest's shell came up."""

    def __init__(self, what: str, *, command: Sequence[str], exit_code: int | None,
                 qemu_log: Path, console: str = "") -> None:
        self.command = list(command)
        self.exit_code = exit_code
        self.qemu_log = qemu_log
        self.log_tail = log_tail(qemu_log)
        self.console_tail = "\n".join(console.splitlines()[-TAIL_LINES:])
        super().__init__(f"QEMU {what}\ncommand: {shlex.join(self.command)}\n"
                         f"{qemu_log}, last lines:\n{self.log_tail or '(empty)'}\n"
                         f"console, last lines:\n{self.console_tail or '(nothing printed)'}")


class BootTimeout(VMLaunchError):
    """QEMU runs, but the guest's shell did not come up within the boot timeout."""


def launch_failure(what: str, kind: type[VMLaunchError], *, qemu: QemuProcess,
                   backend: BackendSupervisor | None, backend_log: Path,
                   grace: float) -> MachineError:
    """Why a launch phase failed: the backend, when it failed first (QEMU then fails too) or
    stopped while QEMU runs; else QEMU, with its exit status once it has exited (it gets
    `grace` seconds to); else `kind(what)`."""
    qemu_status = qemu.exit_status(grace)
    if backend is not None and not backend.alive():
        status = backend.exit_status()
        # It exits 0 by itself once QEMU has gone: then QEMU is the one to ask.
        if qemu_status is None or status not in (0, None):
            why = f"exited with status {status}" if status is not None else "stopped"
            return BackendLaunchError(why, exit_status=status, log_path=backend_log)
    if qemu_status is not None:
        what, kind = f"exited with status {qemu_status}", VMLaunchError
    return kind(what, command=qemu.command, exit_code=qemu_status, qemu_log=qemu.log_path,
                console=qemu.console.transcript if qemu.console is not None else "")


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log; "" when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
