"""One vhost-user front-end connection: message dispatch, memory table, vring lifecycle.

The protocol is kept apart from the device: a device implements `VhostUserDevice` (features,
config space, queue callbacks) and never sees a vhost-user message, in the manner of
rust-vmm's `VhostUserBackend` trait.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import socket
from collections.abc import Callable
from typing import Protocol

from viommu._dataplane import GuestMemory
from viommu.transport.sockets import Readers, close_all
from viommu.transport.vhost_user import messages as m
from viommu.transport.vhost_user.messages import Message, ProtocolError, Request
from viommu.transport.vhost_user.vring import Vring

log = logging.getLogger(__name__)

# Messages whose reply carries a body; every other message is answered only when the
# front-end sets NEED_REPLY (REPLY_ACK).
_HAS_REPLY_BODY = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
    Request.IOTLB_MSG, Request.POSTCOPY_END, Request.CHECK_DEVICE_STATE,
})


class VhostUserDevice(Protocol):
    """What a device implements to be served over vhost-user."""

    num_queues: int

    def features(self) -> int: ...
    def protocol_features(self) -> int: ...
    def set_acked_features(self, features: int) -> None: ...
    def get_config(self) -> bytes: ...
    def set_config(self, offset: int, data: bytes) -> None: ...
    def memory_changed(self, mem: GuestMemory) -> None: ...
    def queue_started(self, index: int, vring: Vring) -> bool:
        """A ring runs; True when the device waits for its kicks itself (on
        `vring.kick_fd`, which stays the connection's), False to have `queue_kicked`
        called on each."""
        ...
    def queue_stopped(self, index: int) -> None: ...
    def queue_call_changed(self, index: int) -> None:
        """A running ring's call fd was replaced (`vring.call_fd`; the old one is closed)."""
        ...
    def queue_kicked(self, index: int) -> None: ...
    def reset(self, reason: str) -> None: ...


class VhostUserConnection:
    """Serves one front-end on a connected socket; drive it with `on_readable()`."""

    def __init__(self, sock: socket.socket, device: VhostUserDevice, readers: Readers) -> None:
        """`readers` watches the kick fds of rings the device leaves to the connection."""
        self.sock = sock
        self.sock.settimeout(5.0)
        self.device = device
        self._readers = readers
        self.mem = GuestMemory()
        self._mappings: list[mmap.mmap] = []
        self.vrings = [Vring(self.mem, i) for i in range(device.num_queues)]
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.status = 0
        self.closed = False
        self.messages_seen = 0
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._ignore,
            Request.RESET_OWNER: self._ignore,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SET_VRING_ENDIAN: self._ignore,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.RESET_DEVICE: self._reset_device,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
        }

    # --- socket I/O ---------------------------------------------------------------------

    def on_readable(self) -> None:
        """Read and serve one message; closes the connection on EOF or a broken stream."""
        try:
            msg = self._read_message()
        except (OSError, ProtocolError) as exc:
            log.error("vhost-user: dropping the connection: %s", exc)
            self.close()
            return
        if msg is None:
            log.warning("vhost-user: front-end closed the connection")
            self.close()
            return
        self.messages_seen += 1
        self._dispatch(msg)

    def _read_message(self) -> Message | None:
        fds = array.array("i")
        data, ancdata, _flags, _addr = self.sock.recvmsg(
            m.HEADER.size, socket.CMSG_SPACE(m.MAX_FDS * fds.itemsize))
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
        received = list(fds)
        if not data:
            close_all(received)
            return None
        try:
            if len(data) < m.HEADER.size:
                data += self._recv_exact(m.HEADER.size - len(data))
            request, flags, size = m.HEADER.unpack(data)
            if size > m.MAX_PAYLOAD:
                raise ProtocolError(f"{m.request_name(request)} announces a {size}-byte "
                                    f"payload (limit {m.MAX_PAYLOAD})")
            payload = self._recv_exact(size) if size else b""
        except BaseException:
            close_all(received)  # a message that never completes owns no fds
            raise
        return Message(request, flags, payload, received)

    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise ProtocolError("connection closed in the middle of a message")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _send(self, request: int, payload: bytes) -> None:
        self.sock.sendall(m.HEADER.pack(request, m.REPLY_FLAGS, len(payload)) + payload)

    def _dispatch(self, msg: Message) -> None:
        log.debug("vhost-user: <- %s flags=%#x size=%d fds=%d", msg.name, msg.flags,
                  len(msg.payload), len(msg.fds))
        handler = self._handlers.get(msg.request)
        try:
            if handler is None:
                self._unsupported(msg)
                reply, ok = None, False
            else:
                reply, ok = handler(msg), True
        except (ProtocolError, ValueError, OverflowError, OSError) as exc:
            log.error("vhost-user: %s rejected: %s", msg.name, exc)
            reply, ok = None, False
        finally:
            # Handlers take the fds they keep out of msg.fds; the rest must not leak.
            close_all(msg.fds)
        if msg.request in _HAS_REPLY_BODY:
            # The front-end blocks on this reply: always send one. On failure a non-zero u64
            # (the failure value of every u64 status reply); where a body of another size
            # was due, the front-end rejects the size with its own error instead of hanging.
            self._send(msg.request, reply if reply is not None else m.pack_u64(1))
        elif msg.need_reply:
            self._send(msg.request, m.pack_u64(0 if ok else 1))

    def _unsupported(self, msg: Message) -> None:
        close_all(msg.fds)
        log.warning("vhost-user: %s (%d) is not supported by this back-end (%d payload bytes, "
                    "%d fds); answered as a failure", msg.name, msg.request, len(msg.payload),
                    len(msg.fds))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for vring in self.vrings:
            self._stop_ring(vring)
            vring.close_fds()
        self._readers.remove_reader(self.sock.fileno())
        self.sock.close()
        self._unmap_memory()

    # --- features -------------------------------------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return m.pack_u64(self.device.features())

    def _set_features(self, msg: Message) -> None:
        features = m.u64(msg.payload)
        unknown = features & ~self.device.features()
        if unknown:
            raise ProtocolError(f"front-end acked features {unknown:#x} that were not offered")
        self.acked_features = features
        self.device.set_acked_features(features)

    def _get_protocol_features(self, msg: Message) -> bytes:
        return m.pack_u64(self.device.protocol_features())

    def _set_protocol_features(self, msg: Message) -> None:
        features = m.u64(msg.payload)
        self.acked_protocol_features = features & self.device.protocol_features()

    def _get_queue_num(self, msg: Message) -> bytes:
        return m.pack_u64(self.device.num_queues)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return m.pack_u64(m.VHOST_MEMORY_BASELINE_NREGIONS)

    def _set_status(self, msg: Message) -> None:
        self.status = m.u64(msg.payload)

    def _get_status(self, msg: Message) -> bytes:
        return m.pack_u64(self.status)

    def _ignore(self, msg: Message) -> None:
        close_all(msg.fds)

    # --- config space -----------------------------------------------------------------------

    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags, _ = m.config_access(msg.payload)
        config = self.device.get_config()
        if offset + size > len(config):
            raise ProtocolError(f"GET_CONFIG [{offset}, +{size}) is outside the "
                                f"{len(config)}-byte config space")
        # The reply must be exactly the request's size (QEMU: "Received bad msg size").
        return m.pack_config(offset, flags, config[offset:offset + size])

    def _set_config(self, msg: Message) -> None:
        offset, _size, _flags, data = m.config_access(msg.payload)
        self.device.set_config(offset, data)

    # --- memory table -------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        regions = m.memory_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise ProtocolError(f"SET_MEM_TABLE has {len(regions)} regions and "
                                f"{len(msg.fds)} fds")
        for vring in self.vrings:
            vring.vq.stop()
        self._unmap_memory()
        try:
            for region, fd in zip(regions, msg.fds, strict=True):
                mapping = mmap.mmap(fd, region.mmap_offset + region.memory_size,
                                    mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                self._mappings.append(mapping)
                self.mem.add_region(region.guest_phys_addr, region.memory_size,
                                    region.userspace_addr, mapping, region.mmap_offset)
                log.info("vhost-user: region gpa=%#x size=%#x", region.guest_phys_addr,
                         region.memory_size)
        finally:
            close_all(msg.fds)
        for vring in self.vrings:
            if vring.running:
                self._resolve(vring)
        self.device.memory_changed(self.mem)

    def _unmap_memory(self) -> None:
        self.mem.clear()
        for mapping in self._mappings:
            mapping.close()
        self._mappings = []

    # --- vrings ---------------------------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"vring index {index} out of range (device has "
                                f"{len(self.vrings)} queues)")
        return self.vrings[index]

    def _set_vring_num(self, msg: Message) -> None:
        index, num = m.vring_state(msg.payload)
        self._vring(index).vq.set_num(num)  # refuses sizes that are no power of 2 <= 32768

    def _set_vring_addr(self, msg: Message) -> None:
        addr = m.vring_addr(msg.payload)
        vring = self._vring(addr.index)
        if vring.stopped_at is not None and vring.addr is not None and (
                (addr.desc, addr.avail, addr.used)
                != (vring.addr.desc, vring.addr.avail, vring.addr.used)):
            self._guest_reset(f"vring {addr.index} restarted at new addresses")
        vring.addr = addr
        vring.vq.set_addr(addr.desc, addr.avail, addr.used)

    def _set_vring_base(self, msg: Message) -> None:
        index, base = m.vring_state(msg.payload)
        if base > 0xFFFF:
            raise ProtocolError(f"vring base {base} does not fit a 16-bit ring index")
        vring = self._vring(index)
        if vring.stopped_at is not None and base != vring.stopped_at:
            self._guest_reset(f"vring {index} restarted at base {base}, stopped at "
                              f"{vring.stopped_at}")
        vring.base = base
        vring.vq.set_base(base)

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = m.vring_state(msg.payload)
        vring = self._vring(index)
        self._stop_ring(vring)
        vring.stopped_at = vring.vq.last_avail
        return m.pack_vring_state(index, vring.stopped_at)

    def _ring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        value = m.u64(msg.payload)
        vring = self._vring(value & m.VHOST_USER_VRING_IDX_MASK)
        if value & m.VHOST_USER_VRING_NOFD_MASK:
            if msg.fds:
                raise ProtocolError(f"{msg.name} says NOFD but carries {len(msg.fds)} fds")
            return vring, None
        if len(msg.fds) != 1:
            raise ProtocolError(f"{msg.name} needs exactly one fd, got {len(msg.fds)}")
        return vring, msg.fds.pop()  # the vring owns it now

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._ring_fd(msg)
        self._stop_ring(vring)
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
        if fd is None:
            log.error("vhost-user: vring %d without a kick fd (polling) is not supported",
                      vring.index)
        else:
            os.set_blocking(fd, False)
        vring.kick_fd = fd
        if not self.acked_features & (1 << 30):  # VHOST_USER_F_PROTOCOL_FEATURES
            vring.enabled = True
        self._maybe_start(vring)

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._ring_fd(msg)
        if vring.call_fd is not None:
            os.close(vring.call_fd)
        vring.call_fd = fd
        if vring.running:
            self.device.queue_call_changed(vring.index)

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._ring_fd(msg)
        if vring.err_fd is not None:
            os.close(vring.err_fd)
        vring.err_fd = fd

    def _set_vring_enable(self, msg: Message) -> None:
        index, enable = m.vring_state(msg.payload)
        vring = self._vring(index)
        vring.enabled = bool(enable)
        if vring.enabled:
            self._maybe_start(vring)
        else:
            self._stop_ring(vring)

    def _maybe_start(self, vring: Vring) -> None:
        if vring.running or not vring.enabled or vring.kick_fd is None or vring.addr is None:
            return
        if not self._resolve(vring):
            return
        vring.running = True
        vring.stopped_at = None
        owned = self.device.queue_started(vring.index, vring)
        vring.kick_watched = not owned
        if vring.kick_watched:
            self._readers.add_reader(vring.kick_fd, lambda: self._on_kick(vring))
            # Buffers made available before the kick fd existed are served now.
            self.device.queue_kicked(vring.index)

    def _resolve(self, vring: Vring) -> bool:
        try:
            vring.vq.start()
        except ValueError as exc:
            log.error("vhost-user: cannot start vring %d: %s", vring.index, exc)
            return False
        return True

    def _stop_ring(self, vring: Vring) -> None:
        if not vring.running:
            return
        vring.running = False
        if vring.kick_watched:
            self._readers.remove_reader(vring.kick_fd)
            vring.kick_watched = False
        self.device.queue_stopped(vring.index)  # first: a device thread may still use it
        vring.vq.stop()

    def _on_kick(self, vring: Vring) -> None:
        try:
            os.eventfd_read(vring.kick_fd)
        except BlockingIOError:
            pass
        self.device.queue_kicked(vring.index)

    def _reset_device(self, msg: Message) -> None:
        for vring in self.vrings:
            self._stop_ring(vring)
            vring.stopped_at = None
        self.device.reset("RESET_DEVICE from the front-end")

    def _guest_reset(self, why: str) -> None:
        for vring in self.vrings:
            vring.stopped_at = None
        self.device.reset(f"guest reset ({why})")

