"""The guest's shell on its serial console, taken over for the controller (no echo, no
prompt: busybox then skips line editing) and given back for a person (`viommu console`)."""

from __future__ import annotations

import time

from viommu.vm.console import Console, ConsoleError
from viommu.vm.errors import MachineError
from viommu.vm.qemu_process import QemuProcess

READY_LINE = r"viommu-guest: ready"  # the guest image's init prints it when its shell runs
# The fault line of Linux's virtio-iommu driver (drivers/iommu/virtio-iommu.c,
# viommu_fault_handler): dev_err's "virtio_iommu virtioN: " prefix, then the driver's text.
GUEST_FAULT_LINE = r"virtio_iommu virtio\d+: (?:unknown|domain|page) fault from EP \d+.*$"
# Linux's DEFAULT_RATELIMIT_INTERVAL (include/linux/ratelimit_types.h) for those lines, plus a
# margin for jiffies and delivery
GUEST_FAULT_WINDOW_S = 5.0 + 0.3


def wait_fault_window(last_event: float | None) -> float:
    """Wait until the guest will print its next 10 fault lines: Linux rate-limits them
    (dev_err_ratelimited: 10 per 5 s window, opened by the first line after the last window
    ran out), so 5 s after the last event the backend sent (time.time() `last_event`), a fresh
    window opens. Returns the seconds waited (0 when that is already past)."""
    wait = last_event + GUEST_FAULT_WINDOW_S - time.time() if last_event is not None else 0.0
    if wait > 0:
        time.sleep(wait)
    return max(wait, 0.0)


class GuestShell:
    def __init__(self, qemu: QemuProcess, name: str) -> None:
        self.qemu = qemu
        self.name = name
        self.lazy = False  # a detached VM found again: take the console on first use

    def console(self) -> Console:
        """The console with the shell taken; MachineError when the VM does not run."""
        if self.qemu.console is None and self.lazy:
            console = self.qemu.open_console()
            try:
                self.take(console, timeout=10)
            except ConsoleError as exc:
                raise MachineError(f"{self.name}'s guest shell did not answer within 10 s: "
                                   "the serial console takes one client at a time; leave "
                                   "`viommu console` (Ctrl-]) and try again") from exc
        if self.qemu.console is None:
            raise MachineError(f"{self.name} is not running")
        return self.qemu.console

    def wait_ready(self, timeout: float, since: int = 0) -> None:
        """Wait for the guest's shell (ConsoleError after `timeout`), and take it."""
        console = self.qemu.console
        console.wait_for(READY_LINE, timeout=timeout, since=since)
        self.take(console)

    @staticmethod
    def take(console: Console, timeout: float = 30) -> None:
        console.send_line("stty -echo; PS1=''")
        console.run("true", timeout).check()

    def give_back(self) -> None:
        """Echo and prompt back, for whoever attaches next."""
        if self.qemu.console is not None:
            # run(), not send_line(): QEMU drops what it has not read when a client leaves.
            self.qemu.console.run("stty echo; . /etc/profile")

    def reboot(self, timeout: float) -> float:
        """A guest-initiated reset, as `reboot -f` does on hardware; the seconds until the
        shell is back."""
        started = time.monotonic()
        console = self.console()
        mark = console.mark()
        console.send_line("reboot -f")
        self.wait_ready(timeout, since=mark)
        return time.monotonic() - started
