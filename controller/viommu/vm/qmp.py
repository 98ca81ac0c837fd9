"""QMP to one peer of a Machine, QEMU's monitor or the backend's control socket: connected at
launch, or on first use when the VM was found again (`Machine.attach`)."""

from __future__ import annotations

import logging
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from viommu.vm.errors import QMP_ERRORS, MachineError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # for a detached VM's peer to greet us (QEMU's QMP takes one client)


class QmpChannel:
    def __init__(self, path: str, who: str) -> None:
        self.path = path
        self.who = who
        self.client: QEMUMonitorProtocol | None = None
        self.lazy = False  # connect on first use

    @property
    def connected(self) -> bool:
        return self.client is not None

    def listen(self) -> None:
        """Be the server the peer connects to (QEMU, as our child, connects to us)."""
        self.client = QEMUMonitorProtocol(self.path, server=True)

    def accept(self, timeout: float) -> None:
        self.client.accept(timeout=timeout)

    def connect(self, timeout: float | None = None) -> None:
        """Connect and negotiate; within `timeout` seconds when given (MachineError after:
        the peer is stuck, or another client holds a monitor that takes one at a time)."""
        client = QEMUMonitorProtocol(self.path)
        try:
            if timeout is None:
                client.connect()
            else:  # the legacy connect() has no timeout; it is this, without one
                client._sync(client._qmp.connect(self.path), timeout)
        except QMP_ERRORS as exc:
            why = (f"no greeting within {timeout:g} s (its QMP takes one client at a time: is "
                   "`viommu shell` holding it?)" if isinstance(exc, TimeoutError) else exc)
            raise MachineError(f"could not connect to {self.who}'s QMP socket {self.path}: "
                               f"{why}") from exc
        self.client = client

    def execute(self, command: str, args: dict[str, Any]) -> Any:
        """Run `command` (argument names with "_" sent with "-"); MachineError with the
        peer's error."""
        if self.client is None and self.lazy:
            self.connect(CONNECT_TIMEOUT_S)
        if self.client is None:
            raise MachineError(f"no QMP connection to {self.who}")
        response = self.client.cmd_raw(command,
                                       {k.replace("_", "-"): v for k, v in args.items()})
        if "error" in response:
            raise MachineError(f"{self.who} {command}: {response['error']['desc']}")
        return response["return"]

    def close(self) -> None:
        """Close it now, whatever became of the peer: nothing is left for qemu.qmp's
        QEMUMonitorProtocol.__del__ to close at exit (which prints the peer's EOFError)."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            client.close()
        except QMP_ERRORS as exc:  # it hung up first: nothing is left to close
            log.debug("the QMP connection to %s had ended: %r", self.who, exc)
