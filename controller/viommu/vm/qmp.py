"""QMP to one peer of a Machine, QEMU's monitor or the backend's control socket: connected at
launch, or on first use when the VM was found again (`Machine.attach`)."""

from __future__ import annotations

import logging
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from viommu.vm.errors import QMP_ERRORS, MachineError

log = logging.getLogger(__name__)


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

    def connect(self) -> None:
        client = QEMUMonitorProtocol(self.path)
        try:
            client.connect()
        except QMP_ERRORS as exc:
            raise MachineError(f"could not connect to {self.who}'s QMP socket {self.path}: "
                               f"{exc}") from exc
        self.client = client

    def execute(self, command: str, args: dict[str, Any]) -> Any:
        """Run `command` (argument names with "_" sent with "-"); MachineError with the
        peer's error."""
        if self.client is None and self.lazy:
            self.connect()
        if self.client is None:
            raise MachineError(f"no QMP connection to {self.who}")
        response = self.client.cmd_raw(command,
                                       {k.replace("_", "-"): v for k, v in args.items()})
        if "error" in response:
            raise MachineError(f"{self.who} {command}: {response['error']['desc']}")
        return response["return"]

    def close(self) -> None:
        if self.client is None:
            return
        try:
            self.client.close()
        except QMP_ERRORS as exc:  # it hung up first: nothing is left to close
            log.debug("the QMP connection to %s had ended: %r", self.who, exc)
        self.client = None
