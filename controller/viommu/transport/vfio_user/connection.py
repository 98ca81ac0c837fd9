"""One vfio-user client connection: message dispatch, client memory, interrupt eventfds.

The protocol is kept apart from the device: a device implements `VfioUserDevice` (regions,
IRQ indexes, region access, reset) and never sees a vfio-user message; the connection hands
it a `VfioUserClient` (the client's DMA memory and interrupt delivery) while one is attached.
Drive it with `on_readable()` from an event loop reader, as VhostUserConnection is driven.

Every request gets a reply unless it carries NO_REPLY (QEMU posts BAR writes that way and
would count an unexpected reply as a protocol error); a refused request gets an error reply
with an errno and a log line; nothing a client sends raises out of `on_readable()`.
"""

from __future__ import annotations

import array
import collections
import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

from viommu.transport.sockets import close_all
from viommu.transport.vfio_user import messages as m
from viommu.transport.vfio_user.dma import DmaMemory
from viommu.transport.vfio_user.irqs import IrqEventfds
from viommu.transport.vfio_user.messages import Command, Message, ProtocolError

log = logging.getLogger(__name__)

# What this server receives per message and advertises in its VERSION reply.
MAX_FDS = m.VFIO_USER_DEF_MAX_FDS
MAX_DATA_XFER_SIZE = m.VFIO_USER_DEF_MAX_XFER  # >= 4 KiB: QEMU reads config space in one go
MAX_DMA_MAPS = 1024
# The largest message served: a REGION_WRITE of MAX_DATA_XFER_SIZE bytes.
MAX_MESSAGE_SIZE = m.HEADER.size + m.RegionAccess.STRUCT.size + MAX_DATA_XFER_SIZE
# A longer message is drained and refused up to this size, beyond it the stream is dropped.
MAX_DRAIN_SIZE = m.VFIO_USER_MAX_MAX_XFER + 4096
# Requests that may carry fds; any other request carrying some is refused.
_FD_COMMANDS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})


class VfioUserClient(Protocol):
    """What a device gets from its client while connected."""

    memory: DmaMemory

    def interrupt(self, index: int, vector: int = 0) -> bool: ...


class VfioUserDevice(Protocol):
    """What a device implements to be served over vfio-user (a PCI device: region and IRQ
    indexes are <linux/vfio.h>'s VFIO_PCI_* numbering)."""

    def device_flags(self) -> int: ...
    def region_info(self, index: int) -> tuple[int, int]: ...  # (flags, size); size 0: none
    def irq_info(self, index: int) -> tuple[int, int]: ...  # (flags, count); count 0: none
    def region_read(self, index: int, offset: int, count: int) -> bytes: ...
    def region_write(self, index: int, offset: int, data: bytes) -> None: ...
    def reset(self, reason: str) -> None: ...
    def connected(self, client: VfioUserClient) -> None: ...
    # (vector, masked) changes the client asked of an index the device reports MASKABLE
    def irq_mask(self, index: int, changes: list[tuple[int, bool]]) -> None: ...
    def disconnected(self) -> None: ...
    def close(self) -> None: ...  # the endpoint is gone: let go of what the device holds


class VfioUserConnection:
    """Serves one client on a connected socket; drive it with `on_readable()`."""

    def __init__(self, sock: socket.socket, device: VfioUserDevice,
                 remove_reader: Callable[[int], None] = lambda fd: None,
                 name: str = "vfio-user") -> None:
        self.sock = sock
        self.sock.settimeout(5.0)  # a message's rest must follow its header promptly
        self.device = device
        self.name = name
        self._remove_reader = remove_reader
        self.memory = DmaMemory(MAX_DMA_MAPS)
        self.irqs = IrqEventfds(name)
        self.version: m.Version | None = None
        self.closed = False
        # What the client sent, for tests and diagnosis: counts by command name, and the
        # names in order (the last 4096).
        self.commands = collections.Counter()
        self.history: collections.deque[str] = collections.deque(maxlen=4096)
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._device_get_info,
            Command.DEVICE_GET_REGION_INFO: self._device_get_region_info,
            Command.DEVICE_GET_IRQ_INFO: self._device_get_irq_info,
            Command.DEVICE_SET_IRQS: self._device_set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.REGION_WRITE_MULTI: self._region_write_multi,
            Command.DEVICE_RESET: self._device_reset,
        }
        device.connected(self)

    # --- socket I/O ---------------------------------------------------------------------

    def on_readable(self) -> None:
        """Read and serve one message; closes the connection on EOF or a broken stream."""
        if self.closed:
            return
        try:
            msg, problem = self._read_message()
        except (OSError, ProtocolError) as exc:
            log.error("%s: dropping the connection: %s", self.name, exc)
            self.close()
            return
        if msg is None:
            log.info("%s: client closed the connection", self.name)
            self.close()
            return
        try:
            self._dispatch(msg, problem)
        except OSError as exc:  # the reply could not be sent: the client is gone
            log.error("%s: cannot answer %s: %s; dropping the connection", self.name,
                      msg.name, exc)
            self.close()
        finally:
            close_all(msg.fds)

    def _read_message(self) -> tuple[Message | None, ProtocolError | None]:
        """The next message, and why it must be refused when it cannot be served (too long,
        fds lost); (None, None) at EOF."""
        fds = array.array("i")
        data, ancdata, flags, _addr = self.sock.recvmsg(
            m.HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
        if not data:
            close_all(fds)
            return None, None
        try:
            msg_id, command, msg_flags, error, size, payload, problem = self._read_body(data)
        except BaseException:
            close_all(fds)  # a message that never completes owns no fds
            raise
        if flags & socket.MSG_CTRUNC:
            problem = ProtocolError(f"more than {MAX_FDS} fds (max_msg_fds); the kernel "
                                    f"dropped the rest, so the request is refused whole")
        return Message(msg_id, command, msg_flags, error, payload, list(fds)), problem

    def _read_body(self, data: bytes):
        if len(data) < m.HEADER.size:
            data += self._recv_exact(m.HEADER.size - len(data))
        msg_id, command, size, msg_flags, error = m.HEADER.unpack(data)
        if size < m.HEADER.size or size > MAX_DRAIN_SIZE:
            raise ProtocolError(f"{m.command_name(command)} id {msg_id} announces a {size}-byte "
                                f"message; the stream cannot be trusted any more")
        problem = None
        if size > MAX_MESSAGE_SIZE:
            self._discard(size - m.HEADER.size)
            payload = b""
            problem = ProtocolError(f"message of {size} bytes exceeds the {MAX_MESSAGE_SIZE} "
                                    f"this server takes (max_data_xfer_size "
                                    f"{MAX_DATA_XFER_SIZE})", errno.E2BIG)
        else:
            payload = self._recv_exact(size - m.HEADER.size)
        return msg_id, command, msg_flags, error, size, payload, problem

    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ProtocolError("connection closed in the middle of a message")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _discard(self, n: int) -> None:
        while n:
            n -= len(self._recv_exact(min(n, 1 << 20)))

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # --- dispatch -----------------------------------------------------------------------

    def _dispatch(self, msg: Message, problem: ProtocolError | None = None) -> None:
        log.debug("%s: <- %s id=%d size=%d flags=%#x fds=%d", self.name, msg.name, msg.msg_id,
                  m.HEADER.size + len(msg.payload), msg.flags, len(msg.fds))
        self.commands[msg.name] += 1
        self.history.append(msg.name)
        if msg.type == m.VFIO_USER_REPLY:
            log.warning("%s: unexpected reply to id %d (%s); this server sends no requests",
                        self.name, msg.msg_id, msg.name)
            return
        try:
            if problem is not None:
                raise problem
            reply = self._serve(msg)
        except ProtocolError as exc:
            self._refuse(msg, exc.errno, str(exc))
        except (ValueError, OverflowError, struct.error) as exc:
            self._refuse(msg, errno.EINVAL, str(exc))
        except OSError as exc:  # from the device or an mmap: the client's request failed
            self._refuse(msg, exc.errno or errno.EIO, str(exc))
        except Exception:  # a device bug: answer anyway, or the client waits out its timeout
            log.exception("%s: %s id %d failed inside the server", self.name, msg.name,
                          msg.msg_id)
            self._refuse(msg, errno.EIO, "internal error, see the traceback above")
        else:
            if not msg.no_reply:
                self._send(m.pack_reply(msg.msg_id, msg.command, reply or b""))

    def _serve(self, msg: Message) -> bytes | None:
        if msg.type != m.VFIO_USER_REQUEST:
            raise ProtocolError(f"message type {msg.type} is neither request nor reply")
        handler = self._handlers.get(msg.command)
        if handler is None:
            raise ProtocolError(f"{msg.name} ({msg.command}) is not supported by this server",
                                errno.ENOSYS)
        if msg.fds and msg.command not in _FD_COMMANDS:
            raise ProtocolError(f"{msg.name} carries {len(msg.fds)} fds; only DMA_MAP and "
                                f"DEVICE_SET_IRQS take fds")
        if self.version is None and msg.command != Command.VERSION:
            raise ProtocolError(f"{msg.name} before VERSION: negotiate the version first")
        return handler(msg)

    def _refuse(self, msg: Message, err: int, why: str) -> None:
        log.error("%s: %s id %d refused (%s): %s", self.name, msg.name, msg.msg_id,
                  errno.errorcode.get(err, err), why)
        if not msg.no_reply:
            self._send(m.pack_error(msg.msg_id, msg.command, err))

    def close(self) -> None:
        """Forget the client (memory, eventfds); the device keeps its state (vfio-user.rst
        "Client Disconnection"), so a reconnecting client finds it as it was."""
        if self.closed:
            return
        self.closed = True
        try:
            self._remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()
        self.device.disconnected()
        self.memory.clear()
        self.irqs.close()

    # --- VfioUserClient -----------------------------------------------------------------

    def interrupt(self, index: int, vector: int = 0) -> bool:
        """Signal an IRQ's eventfd; False when the client has not set one."""
        return self.irqs.signal(index, vector)

    # --- version ------------------------------------------------------------------------

    def _version(self, msg: Message) -> bytes:
        proposal = m.parse_version(msg.payload)
        if proposal.major != m.VFIO_USER_MAJOR_VER:
            raise ProtocolError(f"client proposes version {proposal.major}.{proposal.minor}; "
                                f"this server speaks major {m.VFIO_USER_MAJOR_VER}",
                                errno.ENOTSUP)
        minor = min(proposal.minor, m.VFIO_USER_MINOR_VER)
        reply = self._version_reply(minor, proposal.capabilities,
                                    m.HEADER.size + len(msg.payload))
        self.version = m.Version(m.VFIO_USER_MAJOR_VER, minor, proposal.capabilities)
        log.info("%s: version %d.%d, client capabilities %s", self.name,
                 m.VFIO_USER_MAJOR_VER, minor, proposal.capabilities)
        return reply

    def _version_reply(self, minor: int, proposed: dict[str, Any] | None, limit: int) -> bytes:
        """Our capabilities, only those the client proposed (the reply must be a subset).
        QEMU receives the reply into its request's buffer: a longer one is an error there,
        so optional capabilities are dropped until it fits."""
        if proposed is None:
            return m.pack_version(m.VFIO_USER_MAJOR_VER, minor, None)
        ours = {m.VFIO_USER_CAP_MAX_FDS: MAX_FDS,
                m.VFIO_USER_CAP_MAX_XFER: MAX_DATA_XFER_SIZE,
                m.VFIO_USER_CAP_PGSIZES: m.VFIO_USER_DEF_PGSIZE,
                m.VFIO_USER_CAP_MAP_MAX: MAX_DMA_MAPS}
        caps = {k: v for k, v in ours.items() if k in proposed}
        while True:
            payload = m.pack_version(m.VFIO_USER_MAJOR_VER, minor, caps)
            if m.HEADER.size + len(payload) <= limit or not caps:
                return payload
            caps.popitem()

    # --- DMA ----------------------------------------------------------------------------

    def _dma_map(self, msg: Message) -> None:
        req = m.DmaMap.unpack(msg.payload)
        if len(msg.fds) > 1:
            raise ProtocolError(f"DMA_MAP carries {len(msg.fds)} fds; it takes one or none")
        if req.flags & ~(m.VFIO_DMA_MAP_FLAG_READ | m.VFIO_DMA_MAP_FLAG_WRITE):
            raise ProtocolError(f"DMA_MAP flags {req.flags:#x} have unknown bits")
        fd = msg.fds[0] if msg.fds else None
        region = self.memory.add(req.address, req.size, req.flags, fd, req.offset)
        log.debug("%s: DMA region [%#x, +%#x) flags=%#x fd=%s offset=%#x", self.name,
                  region.address, region.size, region.flags, fd is not None, req.offset)

    def _dma_unmap(self, msg: Message) -> bytes:
        req = m.DmaUnmap.unpack(msg.payload)
        if req.flags & m.VFIO_DMA_UNMAP_FLAG_ALL:
            if req.flags != m.VFIO_DMA_UNMAP_FLAG_ALL or req.address or req.size:
                raise ProtocolError(f"DMA_UNMAP ALL with flags {req.flags:#x}, address "
                                    f"{req.address:#x}, size {req.size:#x}: must be alone, 0, 0")
            self.memory.clear()
        elif req.flags:
            raise ProtocolError(f"DMA_UNMAP flags {req.flags:#x} are not supported (no dirty "
                                f"page tracking)", errno.ENOTSUP)
        else:
            self.memory.remove(req.address, req.size)
        return req.pack()  # the reply echoes the request's entry (vfio-user.rst)

    # --- device information -------------------------------------------------------------

    def _device_get_info(self, msg: Message) -> bytes:
        req = m.DeviceInfo.unpack(msg.payload)
        _check_argsz(req.argsz, m.DeviceInfo.STRUCT.size, msg.name)
        return m.DeviceInfo(m.DeviceInfo.STRUCT.size, self.device.device_flags(),
                            m.VFIO_PCI_NUM_REGIONS, m.VFIO_PCI_NUM_IRQS).pack()

    def _device_get_region_info(self, msg: Message) -> bytes:
        req = m.RegionInfo.unpack(msg.payload)
        _check_argsz(req.argsz, m.RegionInfo.STRUCT.size, msg.name)
        flags, size = self._region(req.index)
        return m.RegionInfo(m.RegionInfo.STRUCT.size, flags, req.index, 0, size, 0).pack()

    def _device_get_irq_info(self, msg: Message) -> bytes:
        req = m.IrqInfo.unpack(msg.payload)
        _check_argsz(req.argsz, m.IrqInfo.STRUCT.size, msg.name)
        flags, count = self._irq(req.index)
        return m.IrqInfo(m.IrqInfo.STRUCT.size, flags, req.index, count).pack()

    def _region(self, index: int) -> tuple[int, int]:
        if not 0 <= index < m.VFIO_PCI_NUM_REGIONS:
            raise ProtocolError(f"region index {index} out of range (0..."
                                f"{m.VFIO_PCI_NUM_REGIONS - 1})")
        return self.device.region_info(index)

    def _irq(self, index: int) -> tuple[int, int]:
        if not 0 <= index < m.VFIO_PCI_NUM_IRQS:
            raise ProtocolError(f"IRQ index {index} out of range (0...{m.VFIO_PCI_NUM_IRQS - 1})")
        return self.device.irq_info(index)

    # --- interrupts ---------------------------------------------------------------------

    def _device_set_irqs(self, msg: Message) -> None:
        req = m.IrqSet.unpack(msg.payload)
        flags, count = self._irq(req.index)
        changes = self.irqs.set_irqs(req, flags, count, msg.fds)
        if changes:  # MASK/UNMASK of a maskable index: the device's business
            self.device.irq_mask(req.index, changes)

    # --- region access ------------------------------------------------------------------

    def _region_read(self, msg: Message) -> bytes:
        req = m.RegionAccess.unpack(msg.payload, msg.name)
        if req.data:
            raise ProtocolError(f"REGION_READ carries {len(req.data)} data bytes")
        self._check_access(req, m.VFIO_REGION_INFO_FLAG_READ)
        data = self.device.region_read(req.region, req.offset, req.count)
        log.debug("%s: region %d [%#x, +%d] -> %s", self.name, req.region, req.offset,
                  req.count, data[:8].hex())
        return m.RegionAccess(req.offset, req.region, len(data), data).pack()

    def _region_write(self, msg: Message) -> bytes:
        req = m.RegionAccess.unpack(msg.payload, msg.name)
        if len(req.data) != req.count:
            raise ProtocolError(f"REGION_WRITE count {req.count} with {len(req.data)} bytes")
        self._check_access(req, m.VFIO_REGION_INFO_FLAG_WRITE)
        log.debug("%s: region %d [%#x, +%d] <- %s", self.name, req.region, req.offset,
                  req.count, req.data[:8].hex())
        self.device.region_write(req.region, req.offset, req.data)
        return m.RegionAccess(req.offset, req.region, req.count).pack()

    def _region_write_multi(self, msg: Message) -> bytes:
        """Coalesced posted writes; each is checked and applied in order (a refused one
        stops the rest, and the reply, if any, says how many were applied)."""
        writes = m.parse_write_multi(msg.payload)
        for done, write in enumerate(writes):
            try:
                self._check_access(write, m.VFIO_REGION_INFO_FLAG_WRITE)
                self.device.region_write(write.region, write.offset, write.data)
            except (ValueError, OSError) as exc:
                log.error("%s: REGION_WRITE_MULTI write %d of %d refused: %s", self.name,
                          done, len(writes), exc)
                return m.pack_wr_cnt(done)
        return m.pack_wr_cnt(len(writes))

    def _check_access(self, req: m.RegionAccess, needed: int) -> None:
        flags, size = self._region(req.region)
        if not flags & needed or not size:
            raise ProtocolError(f"region {req.region} does not allow "
                                f"{'reads' if needed == m.VFIO_REGION_INFO_FLAG_READ else 'writes'}"
                                f" (flags {flags:#x}, size {size:#x})")
        if req.count == 0 or req.count > MAX_DATA_XFER_SIZE or req.offset + req.count > size:
            raise ProtocolError(f"access [{req.offset:#x}, +{req.count:#x}) is outside region "
                                f"{req.region} of {size:#x} bytes")

    def _device_reset(self, msg: Message) -> None:
        m.expect_size(msg.payload, 0, msg.name)
        self.device.reset("DEVICE_RESET from the client")


def _check_argsz(argsz: int, needed: int, what: str) -> None:
    if argsz < needed:
        raise ProtocolError(f"{what} argsz {argsz} is below the {needed} bytes of the reply")

