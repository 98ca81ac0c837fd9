"""A real VfioUserConnection serving a real DmaEndpoint, driven over a socketpair the way
QEMU's vfio-user-pci drives it: requests with SCM_RIGHTS fds in, replies out, guest RAM in
a memfd the test also maps to play the guest."""

from __future__ import annotations

import array
import errno
import json
import mmap
import os
import select
import socket
import stat
import struct

import pytest

from viommu.endpoints import dma_engine as ep
from viommu.endpoints.dma_engine import DmaEndpoint, DmaEngine, DmaFault
from viommu.events.smmuv3 import EventId
from viommu.transport.vfio_user import messages as m
from viommu.transport.vfio_user.connection import VfioUserConnection
from viommu.transport.vfio_user.messages import Command, PciIrq, PciRegion
from viommu.transport.vfio_user.server import EndpointServer

GPA = 0x10_0000  # where the test maps its guest RAM
MEM_SIZE = 0x10000
CONFIG, BAR0 = PciRegion.CONFIG, PciRegion.BAR0
# What QEMU 11.1 proposes (hw/vfio-user/proxy.c caps_json), byte for byte.
QEMU_CAPS = {"capabilities": {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
                              "max_msg_fds": 16, "max_data_xfer_size": 1048576,
                              "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": True}}
RW = m.VFIO_DMA_MAP_FLAG_READ | m.VFIO_DMA_MAP_FLAG_WRITE
MSI_TRIGGER = m.VFIO_IRQ_SET_DATA_EVENTFD | m.VFIO_IRQ_SET_ACTION_TRIGGER


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def version_payload(caps: dict | None = QEMU_CAPS, major: int = 0) -> bytes:
    text = b"" if caps is None else json.dumps(caps).encode() + b"\0"
    return struct.pack("<HH", major, 0) + text


class Client:
    """Plays QEMU: sends vfio-user requests and reads the replies."""

    def __init__(self) -> None:
        self.device = DmaEndpoint()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.conn = VfioUserConnection(theirs, self.device)
        self.next_id = 0
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.ram = mmap.mmap(self.memfd, MEM_SIZE)

    def send(self, command: int, payload: bytes = b"", fds=(), flags: int = 0) -> int:
        msg_id, self.next_id = self.next_id, self.next_id + 1
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([m.pack_request(msg_id, command, payload, flags)], ancdata)
        self.conn.on_readable()
        return msg_id

    def recv(self) -> tuple[tuple, bytes]:
        header = m.HEADER.unpack(self._recv_exact(m.HEADER.size))
        return header, self._recv_exact(header[2] - m.HEADER.size)

    def ask(self, command: int, payload: bytes = b"", fds=()) -> tuple[int, bytes]:
        """Send a request; (errno or 0, reply payload)."""
        msg_id = self.send(command, payload, fds)
        (reply_id, reply_command, _size, flags, err), body = self.recv()
        assert (reply_id, reply_command) == (msg_id, command)
        assert flags & m.VFIO_USER_TYPE == m.VFIO_USER_REPLY
        return (err if flags & m.VFIO_USER_ERROR else 0), body

    def ok(self, command: int, payload: bytes = b"", fds=()) -> bytes:
        err, body = self.ask(command, payload, fds)
        assert err == 0, errno.errorcode.get(err, err)
        return body

    def nothing_pending(self) -> bool:
        return not select.select([self.sock], [], [], 0)[0]

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    # --- what QEMU does ------------------------------------------------------------------

    def handshake(self) -> None:
        self.ok(Command.VERSION, version_payload())
        self.map(GPA, MEM_SIZE, self.memfd)

    def map(self, address: int, size: int, fd: int | None, flags: int = RW,
            offset: int = 0) -> int:
        req = m.DmaMap(32, flags, offset, address, size).pack()
        return self.ask(Command.DMA_MAP, req, [fd] if fd is not None else [])[0]

    def read(self, region: int, offset: int, count: int) -> bytes:
        body = self.ok(Command.REGION_READ, m.RegionAccess(offset, region, count).pack())
        return m.RegionAccess.unpack(body, "reply").data

    def write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        payload = m.RegionAccess(offset, region, len(data), data).pack()
        if posted:  # a BAR write: QEMU posts it with NO_REPLY
            self.send(Command.REGION_WRITE, payload, flags=m.VFIO_USER_NO_REPLY)
        else:
            self.ok(Command.REGION_WRITE, payload)

    def reg(self, offset: int) -> int:
        return struct.unpack("<I", self.read(BAR0, offset, 4))[0]

    def set_msi(self, fd: int) -> None:
        self.ok(Command.DEVICE_SET_IRQS, m.IrqSet(20, MSI_TRIGGER, PciIrq.MSI, 0, 1).pack(), [fd])

    def enable(self) -> None:
        """What the guest driver does before DMA: memory + bus master, MSI on."""
        self.write(CONFIG, 0x04, struct.pack("<H", 0x6))
        msi = self.device.config.msi_offset
        self.write(CONFIG, msi + 2, struct.pack("<H", 0x81))

    def transfer(self, src: int, dst: int, length: int, pasid: int = 0) -> None:
        regs = struct.pack("<QQII", src, dst, length, pasid)
        self.write(BAR0, ep.REG_SRC, regs, posted=True)
        self.write(BAR0, ep.REG_DOORBELL, struct.pack("<I", 1), posted=True)

    def close(self) -> None:
        self.conn.close()
        self.sock.close()
        self.ram.close()
        os.close(self.memfd)


@pytest.fixture
def client():
    c = Client()
    yield c
    c.close()


@pytest.fixture
def dma(client):
    """A client past VERSION and DMA_MAP, with the device enabled and MSI wired."""
    client.handshake()
    client.enable()
    client.msi = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_msi(client.msi)
    yield client
    os.close(client.msi)


# --- VERSION -------------------------------------------------------------------------------


def test_version_reply_is_nul_terminated_json_no_longer_than_the_request(client) -> None:
    request = version_payload()
    body = client.ok(Command.VERSION, request)
    assert body[-1:] == b"\0" and len(body) <= len(request)
    assert struct.unpack_from("<HH", body) == (0, 0)
    json.loads(body[4:-1])


def test_version_reply_offers_only_capabilities_the_client_proposed(client) -> None:
    body = client.ok(Command.VERSION, version_payload({"capabilities": {"max_msg_fds": 16}}))
    assert json.loads(body[4:-1]) == {"capabilities": {"max_msg_fds": 8}}


def test_version_reply_drops_capabilities_that_would_make_it_longer_than_the_request(
        client) -> None:
    request = version_payload({"capabilities": {"max_data_xfer_size": 1}})
    body = client.ok(Command.VERSION, request)
    assert len(body) <= len(request) and body[-1:] == b"\0"


def test_version_with_another_major_gets_enotsup(client) -> None:
    assert client.ask(Command.VERSION, version_payload(major=1))[0] == errno.ENOTSUP


def test_request_before_version_gets_einval(client) -> None:
    assert client.ask(Command.DEVICE_GET_INFO, bytes(16))[0] == errno.EINVAL


# --- DMA_MAP / DMA_UNMAP ---------------------------------------------------------------------


def test_dma_map_with_a_memfd_gives_the_device_the_guest_ram(client) -> None:
    client.ram[0x2000:0x2004] = b"RAM!"
    client.handshake()
    assert client.conn.memory.read(GPA + 0x2000, 4) == b"RAM!"


def test_dma_map_over_an_existing_region_gets_eexist(client) -> None:
    client.handshake()
    assert client.map(GPA + 0x1000, 0x1000, client.memfd) == errno.EEXIST


def test_dma_map_with_two_fds_gets_einval_and_closes_both(client) -> None:
    client.ok(Command.VERSION, version_payload())
    a, b = os.dup(client.memfd), os.dup(client.memfd)
    before = open_fds()
    err = client.ask(Command.DMA_MAP, m.DmaMap(32, RW, 0, GPA, MEM_SIZE).pack(), [a, b])[0]
    os.close(a)
    os.close(b)
    assert (err, open_fds(), len(client.conn.memory)) == (errno.EINVAL, before - 2, 0)


def test_message_with_more_fds_than_max_msg_fds_is_refused_and_its_fds_closed(client) -> None:
    client.ok(Command.VERSION, version_payload())
    fds = [os.dup(client.memfd) for _ in range(9)]
    before = open_fds()
    err = client.ask(Command.DMA_MAP, m.DmaMap(32, RW, 0, GPA, MEM_SIZE).pack(), fds)[0]
    for fd in fds:
        os.close(fd)
    assert (err, open_fds()) == (errno.EINVAL, before - 9)


def test_fds_on_a_request_that_takes_none_are_refused_and_closed(client) -> None:
    client.ok(Command.VERSION, version_payload())
    efd = os.eventfd(0)
    before = open_fds()
    err = client.ask(Command.DEVICE_GET_INFO, m.DeviceInfo(16, 0, 0, 0).pack(), [efd])[0]
    os.close(efd)
    assert (err, open_fds()) == (errno.EINVAL, before - 1)


def test_dma_unmap_removes_the_region_and_echoes_the_request(client) -> None:
    client.handshake()
    request = m.DmaUnmap(24, 0, GPA, MEM_SIZE).pack()
    assert client.ok(Command.DMA_UNMAP, request) == request
    assert len(client.conn.memory) == 0


def test_dma_unmap_all_removes_every_region(client) -> None:
    client.handshake()
    client.map(0x1000_0000, 0x1000, client.memfd)
    client.ok(Command.DMA_UNMAP, m.DmaUnmap(24, m.VFIO_DMA_UNMAP_FLAG_ALL, 0, 0).pack())
    assert len(client.conn.memory) == 0


def test_dma_unmap_of_part_of_a_region_gets_einval(client) -> None:
    client.handshake()
    assert client.ask(Command.DMA_UNMAP, m.DmaUnmap(24, 0, GPA, 0x1000).pack())[0] == errno.EINVAL


# --- device, region and IRQ information ------------------------------------------------------


def test_device_info_is_a_resettable_pci_device_with_9_regions_and_5_irqs(client) -> None:
    client.handshake()
    info = m.DeviceInfo.unpack(client.ok(Command.DEVICE_GET_INFO, m.DeviceInfo(16, 0, 0, 0).pack()))
    assert info == m.DeviceInfo(16, m.VFIO_DEVICE_FLAGS_PCI | m.VFIO_DEVICE_FLAGS_RESET, 9, 5)


@pytest.mark.parametrize("index,flags,size", [
    (PciRegion.BAR0, m.VFIO_REGION_INFO_FLAG_READ | m.VFIO_REGION_INFO_FLAG_WRITE, 0x1000),
    (PciRegion.CONFIG, m.VFIO_REGION_INFO_FLAG_READ | m.VFIO_REGION_INFO_FLAG_WRITE, 0x1000),
    (PciRegion.BAR1, 0, 0),
    (PciRegion.ROM, 0, 0),
], ids=lambda v: v.name if isinstance(v, PciRegion) else None)
def test_region_info(client, index, flags, size) -> None:
    client.handshake()
    body = client.ok(Command.DEVICE_GET_REGION_INFO, m.RegionInfo(32, 0, index, 0, 0, 0).pack())
    assert m.RegionInfo.unpack(body) == m.RegionInfo(32, flags, index, 0, size, 0)


def test_region_info_of_index_9_gets_einval(client) -> None:
    client.handshake()
    err = client.ask(Command.DEVICE_GET_REGION_INFO, m.RegionInfo(32, 0, 9, 0, 0, 0).pack())[0]
    assert err == errno.EINVAL


@pytest.mark.parametrize("index,count", [(PciIrq.INTX, 0), (PciIrq.MSI, 1), (PciIrq.MSIX, 0)],
                         ids=lambda v: v.name if isinstance(v, PciIrq) else None)
def test_irq_info_counts(client, index, count) -> None:
    client.handshake()
    body = client.ok(Command.DEVICE_GET_IRQ_INFO, m.IrqInfo(16, 0, index, 0).pack())
    assert m.IrqInfo.unpack(body).count == count


# --- config space ----------------------------------------------------------------------------


def test_config_space_has_the_vendor_device_and_class(client) -> None:
    client.handshake()
    vendor, device = struct.unpack("<HH", client.read(CONFIG, 0, 4))
    class_code = int.from_bytes(client.read(CONFIG, 0x09, 3), "little")
    assert (vendor, device, class_code) == (0x1B36, 0x00F0, 0x088000)


def test_config_space_ids_are_read_only(client) -> None:
    client.handshake()
    client.write(CONFIG, 0, b"\xff\xff\xff\xff")
    assert struct.unpack("<HH", client.read(CONFIG, 0, 4)) == (0x1B36, 0x00F0)


def test_bar0_sizing_write_reads_back_the_4k_size_mask(client) -> None:
    client.handshake()
    client.write(CONFIG, 0x10, b"\xff\xff\xff\xff")
    assert struct.unpack("<I", client.read(CONFIG, 0x10, 4))[0] == 0xFFFFF000


def test_unimplemented_bar_and_rom_read_zero_after_sizing(client) -> None:
    client.handshake()
    client.write(CONFIG, 0x14, b"\xff\xff\xff\xff")
    client.write(CONFIG, 0x30, b"\xff\xff\xff\xff")
    assert client.read(CONFIG, 0x14, 4) + client.read(CONFIG, 0x30, 4) == bytes(8)


def test_capability_list_is_pcie_endpoint_then_msi_with_64bit_address(client) -> None:
    client.handshake()
    status = struct.unpack("<H", client.read(CONFIG, 0x06, 2))[0]
    exp = client.read(CONFIG, 0x34, 1)[0]
    exp_id, msi, exp_flags = struct.unpack("<BBH", client.read(CONFIG, exp, 4))
    msi_id, nxt, msi_flags = struct.unpack("<BBH", client.read(CONFIG, msi, 4))
    assert status & 0x10 and (exp_id, exp_flags >> 4 & 0xF) == (0x10, 0)  # PCIe endpoint
    assert (msi_id, nxt, msi_flags & 0x80, msi_flags & 0x0E) == (0x05, 0, 0x80, 0)  # 1 vector


def test_config_write_enables_bus_master_and_keeps_io_space_off(client) -> None:
    client.handshake()
    client.write(CONFIG, 0x04, struct.pack("<H", 0x7))
    assert struct.unpack("<H", client.read(CONFIG, 0x04, 2))[0] == 0x6


# --- DMA through the doorbell ----------------------------------------------------------------


def test_doorbell_copies_in_guest_ram_and_reports_done(dma) -> None:
    dma.ram[0x1000:0x1010] = b"sixteen bytes ok"
    dma.transfer(GPA + 0x1000, GPA + 0x3000, 16)
    assert bytes(dma.ram[0x3000:0x3010]) == b"sixteen bytes ok"
    assert (dma.reg(ep.REG_STATUS), dma.reg(ep.REG_ERROR)) == (ep.STATUS_DONE, 0)


def test_doorbell_signals_the_msi_eventfd(dma) -> None:
    dma.transfer(GPA, GPA + 0x8000, 0x100)
    assert os.eventfd_read(dma.msi) == 1


def test_copy_across_pages_counts_one_completion_and_all_bytes(dma) -> None:
    dma.ram[0x0F00:0x2100] = os.urandom(0x1200)
    dma.transfer(GPA + 0x0F00, GPA + 0x8080, 0x1200)
    assert bytes(dma.ram[0x8080:0x9280]) == bytes(dma.ram[0x0F00:0x2100])
    assert (dma.reg(ep.REG_COMPLETIONS), dma.reg(ep.REG_BYTES_DONE)) == (1, 0x1200)


def test_copy_leaving_the_mapped_regions_stops_at_the_faulting_page(dma) -> None:
    dma.ram[MEM_SIZE - 0x1000:] = b"\xab" * 0x1000
    dma.transfer(GPA + MEM_SIZE - 0x1000, GPA, 0x2000)
    fault_addr = struct.unpack("<Q", dma.read(BAR0, ep.REG_FAULT_ADDR, 8))[0]
    assert (dma.reg(ep.REG_STATUS), dma.reg(ep.REG_ERROR)) == (ep.STATUS_ERROR,
                                                                EventId.F_TRANSLATION)
    assert (fault_addr, dma.reg(ep.REG_BYTES_DONE)) == (GPA + MEM_SIZE, 0x1000)
    assert bytes(dma.ram[:0x1001]) == b"\xab" * 0x1000 + b"\0"


def test_failed_copy_also_signals_the_msi_eventfd(dma) -> None:
    dma.transfer(0, GPA, 0x10)
    assert os.eventfd_read(dma.msi) == 1


def test_write_to_a_region_mapped_read_only_faults_with_f_permission(dma) -> None:
    dma.map(0x200_0000, 0x1000, dma.memfd, flags=m.VFIO_DMA_MAP_FLAG_READ)
    dma.transfer(GPA, 0x200_0000, 0x10)
    assert dma.reg(ep.REG_ERROR) == EventId.F_PERMISSION


def test_copy_through_a_region_without_fd_faults(dma) -> None:
    assert dma.map(0xFFFC_0000, 0x1000, None, flags=m.VFIO_DMA_MAP_FLAG_READ) == 0
    dma.transfer(0xFFFC_0000, GPA, 0x10)
    assert dma.reg(ep.REG_STATUS) == ep.STATUS_ERROR


def test_length_over_1_mib_is_an_error_status_not_an_exception(dma) -> None:
    dma.transfer(GPA, GPA + 0x8000, ep.MAX_LEN + 1)
    assert (dma.reg(ep.REG_STATUS), dma.reg(ep.REG_ERROR)) == (ep.STATUS_ERROR, ep.ERR_LENGTH)


def test_doorbell_without_bus_master_is_refused(dma) -> None:
    dma.write(CONFIG, 0x04, struct.pack("<H", 0x2))
    dma.transfer(GPA, GPA + 0x8000, 0x10)
    assert dma.reg(ep.REG_ERROR) == ep.ERR_BUS_MASTER


def test_no_msi_while_the_guest_has_msi_disabled(dma) -> None:
    dma.write(CONFIG, dma.device.config.msi_offset + 2, struct.pack("<H", 0x80))
    dma.transfer(GPA, GPA + 0x8000, 0x10)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(dma.msi)


def test_id_version_and_max_len_registers(dma) -> None:
    assert [dma.reg(o) for o in (ep.REG_ID, ep.REG_VERSION, ep.REG_MAX_LEN)] == [
        ep.ID_VALUE, 1, ep.MAX_LEN]


def test_device_reset_clears_the_registers_and_the_command_register(dma) -> None:
    dma.transfer(GPA, GPA + 0x8000, 0x10)
    dma.ok(Command.DEVICE_RESET)
    assert (dma.reg(ep.REG_STATUS), dma.reg(ep.REG_COMPLETIONS), dma.reg(ep.REG_SRC)) == (0, 0, 0)
    assert dma.device.config.command == 0


def test_region_write_multi_applies_each_write(dma) -> None:
    writes = [m.RegionAccess(ep.REG_LEN, BAR0, 4, struct.pack("<I", 0x40)),
              m.RegionAccess(ep.REG_SRC, BAR0, 8, struct.pack("<Q", GPA))]
    assert dma.ok(Command.REGION_WRITE_MULTI, m.pack_write_multi(writes)) == m.pack_wr_cnt(2)
    assert (dma.reg(ep.REG_LEN), dma.reg(ep.REG_SRC)) == (0x40, GPA)


# --- the DMA engine and its port ---------------------------------------------------------------


class RecordingPort:
    def __init__(self, fault: DmaFault | None = None) -> None:
        self.calls: list[tuple] = []
        self.fault = fault

    def copy(self, pasid, src, dst, length):
        self.calls.append((pasid, src, dst, length))
        return self.fault


def ring(engine: DmaEngine, length: int = 0x10, pasid: int = 0, doorbell: int = 1) -> None:
    engine.write(ep.REG_SRC, struct.pack("<QQII", 0x1000, 0x2000, length, pasid))
    engine.write(ep.REG_DOORBELL, struct.pack("<I", doorbell))


def test_valid_pasid_is_passed_to_the_port_and_no_pasid_as_none() -> None:
    engine, port = DmaEngine(), RecordingPort()
    engine.port = port
    ring(engine, pasid=ep.PASID_VALID | 0x42)
    ring(engine, pasid=0x42)
    assert [c[0] for c in port.calls] == [0x42, None]


def test_reserved_pasid_bits_are_refused_without_reaching_the_port() -> None:
    engine, port = DmaEngine(), RecordingPort()
    engine.port = port
    ring(engine, pasid=ep.PASID_VALID | 1 << 20)
    assert (engine.error, port.calls) == (ep.ERR_PASID, [])


def test_port_fault_sets_its_event_id_fault_address_and_bytes_done() -> None:
    engine = DmaEngine()
    engine.port = RecordingPort(DmaFault(EventId.C_BAD_STE, 0x1000, False, 0))
    ring(engine)
    assert (engine.status, engine.error, engine.state()["fault_addr"]) == (
        ep.STATUS_ERROR, EventId.C_BAD_STE, 0x1000)


def test_port_that_raises_gives_an_internal_error_status() -> None:
    class Broken:
        def copy(self, *args):
            raise RuntimeError("bug")
    engine = DmaEngine()
    engine.port = Broken()
    ring(engine)
    assert (engine.status, engine.error) == (ep.STATUS_ERROR, ep.ERR_INTERNAL)


@pytest.mark.parametrize("length,doorbell,error", [
    (0, 1, ep.ERR_LENGTH), (0x10, 2, ep.ERR_DOORBELL)])
def test_bad_register_values_give_error_status(length, doorbell, error) -> None:
    engine = DmaEngine()
    engine.port = RecordingPort()
    ring(engine, length=length, doorbell=doorbell)
    assert (engine.status, engine.error, engine.completions) == (ep.STATUS_ERROR, error, 1)


def test_doorbell_without_a_client_is_an_error_status() -> None:
    engine = DmaEngine()
    ring(engine)
    assert engine.error == ep.ERR_NO_PATH


def test_read_only_registers_ignore_writes() -> None:
    engine = DmaEngine()
    engine.write(ep.REG_ID, b"\0" * 8)
    engine.write(ep.REG_STATUS, struct.pack("<I", ep.STATUS_DONE))
    assert (engine.read(ep.REG_ID, 4), engine.status) == (struct.pack("<I", ep.ID_VALUE), 0)


# --- interrupts ------------------------------------------------------------------------------


def test_set_irqs_disable_closes_the_msi_eventfd(dma) -> None:
    before = open_fds()
    disable = m.IrqSet(20, m.VFIO_IRQ_SET_DATA_NONE | m.VFIO_IRQ_SET_ACTION_TRIGGER,
                       PciIrq.MSI, 0, 0)
    dma.ok(Command.DEVICE_SET_IRQS, disable.pack())
    assert (open_fds(), dma.conn.interrupt(PciIrq.MSI)) == (before - 1, False)


def test_set_irqs_trigger_with_data_none_fires_the_eventfd(dma) -> None:
    fire = m.IrqSet(20, m.VFIO_IRQ_SET_DATA_NONE | m.VFIO_IRQ_SET_ACTION_TRIGGER,
                    PciIrq.MSI, 0, 1)
    dma.ok(Command.DEVICE_SET_IRQS, fire.pack())
    assert os.eventfd_read(dma.msi) == 1


def test_set_irqs_beyond_the_vector_count_gets_einval(dma) -> None:
    efd = os.eventfd(0)
    req = m.IrqSet(20, MSI_TRIGGER, PciIrq.MSI, 1, 1).pack()
    assert dma.ask(Command.DEVICE_SET_IRQS, req, [efd])[0] == errno.EINVAL
    os.close(efd)


def test_set_irqs_mask_gets_einval(dma) -> None:
    req = m.IrqSet(20, m.VFIO_IRQ_SET_DATA_NONE | m.VFIO_IRQ_SET_ACTION_MASK, PciIrq.MSI, 0, 1)
    assert dma.ask(Command.DEVICE_SET_IRQS, req.pack())[0] == errno.EINVAL


# --- errors, NO_REPLY, disconnect --------------------------------------------------------------


def test_unknown_command_gets_enosys_and_the_connection_keeps_serving(client) -> None:
    client.handshake()
    assert client.ask(99, b"junk")[0] == errno.ENOSYS
    assert client.read(CONFIG, 0, 2) == b"\x36\x1b"


def test_malformed_payload_gets_einval(client) -> None:
    client.handshake()
    assert client.ask(Command.DEVICE_GET_IRQ_INFO, b"short")[0] == errno.EINVAL


def test_access_past_the_end_of_a_region_gets_einval(client) -> None:
    client.handshake()
    err = client.ask(Command.REGION_READ, m.RegionAccess(0xFFE, BAR0, 4).pack())[0]
    assert err == errno.EINVAL


def test_no_reply_write_gets_no_reply(client) -> None:
    client.handshake()
    client.write(BAR0, ep.REG_LEN, struct.pack("<I", 5), posted=True)
    assert client.nothing_pending()
    assert client.reg(ep.REG_LEN) == 5  # and the next reply is the next request's


def test_refused_no_reply_request_gets_no_reply_either(client) -> None:
    client.handshake()
    client.send(Command.REGION_WRITE, m.RegionAccess(0x2000, BAR0, 4, b"xxxx").pack(),
                flags=m.VFIO_USER_NO_REPLY)
    assert client.nothing_pending()


def test_disconnect_unmaps_memory_closes_eventfds_and_detaches_the_device(dma) -> None:
    dma.sock.close()
    before = open_fds()
    dma.conn.on_readable()
    assert dma.conn.closed and len(dma.conn.memory) == 0 and dma.device.client is None
    assert open_fds() == before - 3  # its socket, the MSI eventfd, the mapping's memfd


def test_device_state_survives_a_disconnect(dma) -> None:
    dma.write(BAR0, ep.REG_LEN, struct.pack("<I", 0x77), posted=True)
    dma.sock.close()
    dma.conn.on_readable()
    assert dma.device.engine.read(ep.REG_LEN, 4) == struct.pack("<I", 0x77)


# --- the listening server ----------------------------------------------------------------------


def test_server_socket_is_0600_and_a_second_client_is_refused(tmp_path) -> None:
    path = str(tmp_path / "dma.sock")
    server = EndpointServer(path, DmaEndpoint())
    server.start_in_thread()
    try:
        first = socket.socket(socket.AF_UNIX)
        first.connect(path)
        first.sendall(m.pack_request(0, Command.VERSION, version_payload()))
        first.settimeout(5)
        assert m.HEADER.unpack(first.recv(m.HEADER.size))[3] == m.VFIO_USER_REPLY
        second = socket.socket(socket.AF_UNIX)
        second.connect(path)
        second.settimeout(5)
        assert second.recv(1) == b""  # closed by the server
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and server.refused == 1
        first.close()
        second.close()
    finally:
        server.stop()
