"""The interrupt eventfds a vfio-user client gives a device (VFIO_USER_DEVICE_SET_IRQS, with
<linux/vfio.h>'s vfio_irq_set semantics): one table of vectors per IRQ index."""

from __future__ import annotations

import errno
import logging
import os

from viommu.transport.sockets import close_all
from viommu.transport.vfio_user import messages as m
from viommu.transport.vfio_user.messages import ProtocolError

log = logging.getLogger(__name__)


class IrqEventfds:
    def __init__(self, name: str) -> None:
        self.name = name
        self.fds: dict[int, list[int | None]] = {}

    def set_irqs(self, req: m.IrqSet, flags: int, count: int,
                 fds: list[int]) -> list[tuple[int, bool]]:
        """Apply one SET_IRQS for an index with `count` vectors; the fds it keeps are taken
        out of `fds`. MASK and UNMASK (of an index reporting VFIO_IRQ_INFO_MASKABLE, as an
        INTx line does) return the vectors they change, (vector, masked), for the device."""
        if bin(req.data_type).count("1") != 1 or bin(req.action).count("1") != 1 or (
                req.flags & ~(m.VFIO_IRQ_SET_DATA_TYPE_MASK | m.VFIO_IRQ_SET_ACTION_TYPE_MASK)):
            raise ProtocolError(f"SET_IRQS flags {req.flags:#x} need one DATA and one ACTION")
        if req.data_type != m.VFIO_IRQ_SET_DATA_EVENTFD and fds:
            raise ProtocolError(f"SET_IRQS without DATA_EVENTFD carries {len(fds)} fds")
        if req.action != m.VFIO_IRQ_SET_ACTION_TRIGGER:
            return self._mask(req, flags, count)
        if req.data_type == m.VFIO_IRQ_SET_DATA_NONE and req.count == 0:
            self.disable(req.index)
            return []
        _check_range(req, count)
        if req.data_type == m.VFIO_IRQ_SET_DATA_EVENTFD:
            self._assign(req, fds, count)
        else:
            self._loopback(req)
        return []

    def _mask(self, req: m.IrqSet, flags: int, count: int) -> list[tuple[int, bool]]:
        if not flags & m.VFIO_IRQ_INFO_MASKABLE:
            raise ProtocolError(f"IRQ index {req.index} is not maskable (flags {flags:#x})")
        if req.data_type == m.VFIO_IRQ_SET_DATA_EVENTFD:
            # KVM's INTx resampler: QEMU then falls back to handling the EOI itself
            # (hw/vfio/pci.c:vfio_intx_enable_kvm), with an UNMASK message per EOI.
            raise ProtocolError(f"IRQ index {req.index}: an unmask eventfd is not supported",
                                errno.ENOTSUP)
        _check_range(req, count)
        masked = req.action == m.VFIO_IRQ_SET_ACTION_MASK
        return [(vector, masked) for vector in _chosen_vectors(req)]

    def signal(self, index: int, vector: int = 0) -> bool:
        """Signal an IRQ's eventfd; False when the client has not set one."""
        fds = self.fds.get(index, [])
        fd = fds[vector] if vector < len(fds) else None
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        return True

    def disable(self, index: int) -> None:
        close_all(self.fds.pop(index, []))

    def close(self) -> None:
        for fds in self.fds.values():
            close_all(fds)
        self.fds.clear()

    def _assign(self, req: m.IrqSet, fds: list[int], count: int) -> None:
        """count fds bind vectors start..start+count-1; no fds unbinds them (QEMU sends no
        fd for the -1 entries of a vfio_irq_set)."""
        if fds and len(fds) != req.count:
            raise ProtocolError(f"SET_IRQS EVENTFD for {req.count} vectors carries "
                                f"{len(fds)} fds")
        table = self.fds.setdefault(req.index, [None] * count)
        for i in range(req.count):
            old = table[req.start + i]
            table[req.start + i] = fds[i] if fds else None
            if old is not None:
                os.close(old)
        del fds[:]  # the table owns them now
        log.debug("%s: IRQ index %d vectors %d+%d -> %s", self.name, req.index, req.start,
                  req.count, "eventfds" if table[req.start] is not None else "none")

    def _loopback(self, req: m.IrqSet) -> None:
        """DATA_NONE/DATA_BOOL with TRIGGER: the client fires the interrupt itself."""
        for vector in _chosen_vectors(req):
            self.signal(req.index, vector)


def _check_range(req: m.IrqSet, count: int) -> None:
    if req.start + req.count > count:
        raise ProtocolError(f"SET_IRQS vectors {req.start}+{req.count} exceed the {count} "
                            f"of IRQ index {req.index}")


def _chosen_vectors(req: m.IrqSet) -> list[int]:
    """The vectors a DATA_NONE (all of start..start+count-1) or DATA_BOOL (those whose byte
    is set) request acts on."""
    if req.data_type == m.VFIO_IRQ_SET_DATA_BOOL and len(req.data) != req.count:
        raise ProtocolError(f"SET_IRQS DATA_BOOL for {req.count} vectors carries "
                            f"{len(req.data)} bytes")
    return [req.start + i for i in range(req.count)
            if req.data_type == m.VFIO_IRQ_SET_DATA_NONE or req.data[i]]

