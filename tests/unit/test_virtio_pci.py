"""The virtio-blk endpoint's PCI function (viommu.endpoints.virtio_pci, virtio_common,
virtio_blk) as Linux's virtio_pci and virtio_blk drivers see it: capabilities found the way
drivers/virtio/virtio_pci_modern_dev.c finds them, the common configuration through the
probe sequence of virtio_pci_common.c, feature negotiation and its refusal, MSI-X vectors,
ISR, DEVICE_NEEDS_RESET, the PCI_CFG window, and requests through the notify region."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from blk_driver import SID, T_IN, T_OUT, FakeBlkDriver, pattern
from viommu import _dataplane as hw
from viommu.endpoints import virtio_pci as vp
from viommu.endpoints.pci_config import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_INTERRUPT_PIN
from viommu.endpoints.virtio_blk import BlkOptions, blk_function
from viommu.events.smmuv3 import EventRecord
from viommu.transport.vfio_user.messages import PciIrq, PciRegion
from viommu.uapi import BlkFeature, CommonCfg, DeviceStatus, RingFeature, TransportFeature

NO_VECTOR = 0xFFFF
ACK, DRIVER, FEATURES_OK, DRIVER_OK = (int(DeviceStatus.ACKNOWLEDGE), int(DeviceStatus.DRIVER),
                                       int(DeviceStatus.FEATURES_OK),
                                       int(DeviceStatus.DRIVER_OK))
NEEDS_RESET = int(DeviceStatus.NEEDS_RESET)
ALL = (1 << TransportFeature.F_VERSION_1 | 1 << TransportFeature.F_ACCESS_PLATFORM
       | 1 << BlkFeature.F_SEG_MAX | 1 << BlkFeature.F_BLK_SIZE | 1 << BlkFeature.F_FLUSH
       | 1 << RingFeature.F_INDIRECT_DESC | 1 << BlkFeature.F_DISCARD
       | 1 << BlkFeature.F_WRITE_ZEROES)


class FakeTranslator:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.faults: list[EventRecord] = []

    def fault(self, event: EventRecord) -> None:
        self.faults.append(event)


class FakeClient:
    memory = None

    def __init__(self) -> None:
        self.interrupts: list[tuple[int, int]] = []

    def interrupt(self, index: int, vector: int = 0) -> bool:
        self.interrupts.append((index, vector))
        return True


class Function:
    """The function plus a fake driver's memory, with Linux's accessors."""

    def __init__(self, tmp: Path, **options) -> None:
        self.driver = FakeBlkDriver(tmp, queue_size=256, mem_size=8 << 20)
        self.translator = FakeTranslator(self.driver.engine)
        self.resets: list[str] = []
        self.fn = blk_function(SID, BlkOptions(str(tmp / "fn.img"), size=1 << 20, **options),
                               self.translator, self.resets.append)
        self.client = FakeClient()
        self.fn.connected(self.client)

    def cfg(self, offset: int, size: int) -> int:
        return int.from_bytes(self.fn.region_read(PciRegion.CONFIG, offset, size), "little")

    def set_cfg(self, offset: int, size: int, value: int) -> None:
        self.fn.region_write(PciRegion.CONFIG, offset, value.to_bytes(size, "little"))

    def rd(self, offset: int, size: int) -> int:
        return int.from_bytes(self.fn.region_read(PciRegion.BAR0, offset, size), "little")

    def wr(self, offset: int, size: int, value: int) -> None:
        self.fn.region_write(PciRegion.BAR0, offset, value.to_bytes(size, "little"))

    def status(self) -> int:
        return self.rd(CommonCfg.STATUS, 1)

    def add_status(self, bits: int) -> None:  # virtio_add_status: read, OR, write
        self.wr(CommonCfg.STATUS, 1, self.status() | bits)

    def probe(self, features: int = ALL, msix: bool = True) -> None:
        """virtio_pci_probe + virtio_dev_probe + virtblk_probe, as far as the device sees."""
        self.set_cfg(PCI_COMMAND, 2, PCI_COMMAND_MASTER | 2)
        if msix:
            self.set_cfg(self.fn.config.msix_offset + 2, 2, 0x8000)
        self.wr(CommonCfg.STATUS, 1, 0)
        assert self.status() == 0
        self.add_status(ACK)
        self.add_status(DRIVER)
        for select in range(2):
            self.wr(CommonCfg.GFSELECT, 4, select)
            self.wr(CommonCfg.GF, 4, features >> (32 * select) & 0xFFFF_FFFF)
        self.add_status(FEATURES_OK)

    def setup_queue(self) -> None:
        """vp_find_vqs: vectors with MSI-X (vp_find_vqs_msix), none with INTx."""
        d = self.driver
        msix = bool(self.fn.msix_vectors)
        if msix:
            self.wr(CommonCfg.MSIX, 2, 0)
        self.wr(CommonCfg.Q_SELECT, 2, 0)
        assert self.rd(CommonCfg.Q_SIZE, 2) == 256 and self.rd(CommonCfg.Q_ENABLE, 2) == 0
        for offset, value in ((CommonCfg.Q_DESCLO, d.desc), (CommonCfg.Q_AVAILLO, d.avail),
                              (CommonCfg.Q_USEDLO, d.used)):
            self.wr(offset, 4, value & 0xFFFF_FFFF)
            self.wr(offset + 4, 4, value >> 32)
        if msix:
            self.wr(CommonCfg.Q_MSIX, 2, 1)
            assert self.rd(CommonCfg.Q_MSIX, 2) == 1
        self.wr(CommonCfg.Q_ENABLE, 2, 1)
        self.add_status(DRIVER_OK)

    def kick(self) -> None:
        self.wr(vp.NOTIFY_OFFSET + self.rd(CommonCfg.Q_NOFF, 2) * vp.NOTIFY_OFF_MULTIPLIER, 2, 0)


@pytest.fixture
def f(tmp_path: Path) -> Iterator[Function]:
    fn = Function(tmp_path)
    yield fn
    fn.fn.close()
    fn.driver.close()


def vendor_caps(f: Function) -> dict[int, tuple[int, bytes]]:
    """cfg_type -> (offset, bytes), the first of each type, as virtio_pci_find_capability."""
    found: dict[int, tuple[int, bytes]] = {}
    for pos, cap_id in f.fn.config.capabilities():
        if cap_id == hw.PCI_CAP_ID_VNDR:
            length = f.cfg(pos + 2, 1)
            raw = f.fn.region_read(PciRegion.CONFIG, pos, length)
            found.setdefault(raw[3], (pos, raw))
    return found


# --- identity, capabilities, regions, interrupts ---------------------------------------------


def test_the_function_is_a_modern_virtio_blk_with_no_intx(f: Function) -> None:
    assert (f.cfg(0, 2), f.cfg(2, 2), f.cfg(8, 1)) == (0x1AF4, 0x1042, 1)
    assert f.cfg(9, 3) == 0x010000 and (f.cfg(0x2C, 2), f.cfg(0x2E, 2)) == (0x1AF4, 0x1100)
    assert f.cfg(PCI_INTERRUPT_PIN, 1) == 0


def test_each_virtio_structure_has_its_capability_in_bar0(f: Function) -> None:
    caps = vendor_caps(f)
    assert sorted(caps) == [1, 2, 3, 4, 5]

    def fields(cfg_type: int) -> tuple[int, int, int, int]:
        _, raw = caps[cfg_type]
        return raw[2], raw[4], *struct.unpack_from("<II", raw, 8)

    assert fields(1) == (16, 0, vp.COMMON_OFFSET, 0x40)
    assert fields(2) == (20, 0, vp.NOTIFY_OFFSET, 0x1000)
    assert struct.unpack_from("<I", caps[2][1], 16)[0] == vp.NOTIFY_OFF_MULTIPLIER
    assert fields(3) == (16, 0, vp.ISR_OFFSET, 1)
    assert fields(4) == (16, 0, vp.DEVICE_OFFSET, 0x60)
    assert caps[5][1][2] == 20
    # Linux's minimum for the common structure (sizeof virtio_pci_common_cfg)
    assert fields(1)[3] >= hw.VIRTIO_PCI_COMMON_CFG_SIZE


def test_msix_has_a_vector_for_config_and_one_for_the_queue(f: Function) -> None:
    pos = f.fn.config.msix_offset
    assert f.cfg(pos, 1) == 0x11
    assert f.cfg(pos + 2, 2) & 0x7FF == 1  # Table Size - 1
    assert f.cfg(pos + 4, 4) == vp.MSIX_BAR and f.cfg(pos + 8, 4) == vp.MSIX_PBA_OFFSET | 2
    assert f.fn.irq_info(PciIrq.MSIX) == (1, 2)  # EVENTFD, no NORESIZE
    assert f.fn.irq_info(PciIrq.INTX)[1] == 0 and f.fn.irq_info(PciIrq.MSI)[1] == 0
    assert f.fn.region_info(PciRegion.BAR0) == (3, 0x4000)
    assert f.fn.region_info(2) == (3, 0x1000) and f.fn.region_info(1) == (0, 0)
    assert f.fn.region_read(2, vp.MSIX_PBA_OFFSET, 8) == bytes(8)
    f.fn.region_write(2, 0, b"\x01\x02\x03\x04")
    assert f.fn.region_read(2, 0, 4) == b"\x01\x02\x03\x04"


def test_device_features_read_in_32_bit_words_and_zero_past_them(f: Function) -> None:
    words = []
    for select in range(4):  # Linux 7.x reads four words (VIRTIO_FEATURES_BITS = 128)
        f.wr(CommonCfg.DFSELECT, 4, select)
        words.append(f.rd(CommonCfg.DF, 4))
    assert words[0] | words[1] << 32 == ALL and words[2:] == [0, 0]


def test_the_blk_config_reports_capacity_seg_max_and_block_size(f: Function) -> None:
    assert f.rd(vp.DEVICE_OFFSET, 4) | f.rd(vp.DEVICE_OFFSET + 4, 4) << 32 == (1 << 20) // 512
    assert f.rd(vp.DEVICE_OFFSET + 12, 4) == 254 and f.rd(vp.DEVICE_OFFSET + 20, 4) == 512
    assert f.rd(vp.DEVICE_OFFSET + 34, 2) == 1


# --- negotiation and the common configuration -------------------------------------------------


def test_linux_probe_sequence_negotiates_and_enables_the_queue(f: Function) -> None:
    f.probe()
    assert f.status() == ACK | DRIVER | FEATURES_OK
    f.setup_queue()
    assert f.status() == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert f.fn.device.queue.enabled and f.fn.device.queue.num == 256


@pytest.mark.parametrize("drop", [TransportFeature.F_ACCESS_PLATFORM,
                                  TransportFeature.F_VERSION_1])
def test_features_ok_is_refused_without_version_1_or_access_platform(f: Function,
                                                                     drop: int) -> None:
    f.probe(features=ALL & ~(1 << drop))
    assert not f.status() & FEATURES_OK  # "virtio: device refuses features"


def test_features_not_offered_are_refused(f: Function) -> None:
    f.probe(features=ALL | 1 << RingFeature.F_EVENT_IDX)
    assert not f.status() & FEATURES_OK


def test_features_are_frozen_after_features_ok(f: Function) -> None:
    f.probe()
    f.wr(CommonCfg.GFSELECT, 4, 0)
    f.wr(CommonCfg.GF, 4, 0)
    assert f.fn.common.driver_features == ALL


def test_vectors_past_the_table_read_back_as_no_vector(f: Function) -> None:
    f.wr(CommonCfg.MSIX, 2, 5)
    assert f.rd(CommonCfg.MSIX, 2) == NO_VECTOR
    f.wr(CommonCfg.Q_MSIX, 2, 1)
    assert f.rd(CommonCfg.Q_MSIX, 2) == 1


def test_queue_size_takes_smaller_powers_of_two_and_missing_queues_read_zero(f: Function) -> None:
    f.wr(CommonCfg.Q_SIZE, 2, 100)
    assert f.rd(CommonCfg.Q_SIZE, 2) == 256
    f.wr(CommonCfg.Q_SIZE, 2, 64)
    assert f.rd(CommonCfg.Q_SIZE, 2) == 64
    f.wr(CommonCfg.Q_SELECT, 2, 1)
    assert f.rd(CommonCfg.Q_SIZE, 2) == 0  # spec 4.1.4.3.1: "unavailable"
    assert f.rd(CommonCfg.NUMQ, 2) == 1


def test_writing_status_zero_resets_everything(f: Function) -> None:
    f.probe()
    f.setup_queue()
    f.wr(CommonCfg.STATUS, 1, 0)
    assert f.status() == 0 and f.rd(CommonCfg.Q_ENABLE, 2) == 0
    assert f.rd(CommonCfg.MSIX, 2) == NO_VECTOR and not f.fn.device.queue.enabled


def test_a_full_function_reset_restores_config_space(f: Function) -> None:
    f.probe()
    f.fn.reset("DEVICE_RESET")
    assert f.cfg(PCI_COMMAND, 2) == 0 and f.status() == 0


# --- requests, interrupts, errors -----------------------------------------------------------------


def test_a_kick_serves_requests_and_raises_the_queue_vector(f: Function) -> None:
    f.probe()
    f.setup_queue()
    d = f.driver
    w = d.request(T_OUT, 0, data=pattern(0, 4096))
    f.kick()
    r = d.request(T_IN, 0, in_len=4096)
    f.kick()
    assert (d.status(w), d.status(r)) == (0, 0) and d.read(r.data_gpa, 4096) == pattern(0, 4096)
    assert f.client.interrupts == [(PciIrq.MSIX, 1), (PciIrq.MSIX, 1)]


def test_kicks_before_driver_ok_or_without_bus_mastering_are_ignored(f: Function) -> None:
    f.probe()
    f.driver.request(T_OUT, 0, data=pattern(0, 512))
    f.kick()
    assert f.fn.device.queue.counters()["requests"] == 0
    f.setup_queue()  # DRIVER_OK serves what was queued
    assert f.fn.device.queue.counters()["requests"] == 1
    f.set_cfg(PCI_COMMAND, 2, 2)
    f.driver.request(T_OUT, 0, data=pattern(0, 512))
    f.kick()
    assert f.fn.device.queue.counters()["requests"] == 1


def test_a_data_fault_is_relayed_and_the_request_fails(f: Function) -> None:
    f.probe()
    f.setup_queue()
    d = f.driver
    w = d.request(T_OUT, 0, data=pattern(0, 512))
    d.unmap(w.data_iova)
    f.kick()
    assert d.status(w) == 1
    [event] = f.translator.faults
    assert (event.sid, event.address, event.rnw) == (SID, w.data_iova, True)
    assert f.status() & NEEDS_RESET == 0


def test_a_ring_fault_sets_needs_reset_and_raises_the_config_vector(f: Function) -> None:
    f.probe()
    f.setup_queue()
    f.driver.unmap(f.driver.ring_iova)
    f.kick()
    assert f.status() & NEEDS_RESET
    assert f.client.interrupts[-1] == (PciIrq.MSIX, 0)
    assert f.rd(vp.ISR_OFFSET, 1) == hw.VIRTIO_PCI_ISR_CONFIG
    assert f.rd(vp.ISR_OFFSET, 1) == 0  # reading cleared it
    assert f.resets and "ring access did not translate" in f.resets[0]
    assert len(f.translator.faults) == 1
    f.add_status(0)  # virtio_add_status writes NEEDS_RESET back: the device keeps it
    f.wr(CommonCfg.STATUS, 1, f.status() & ~NEEDS_RESET)
    assert f.status() & NEEDS_RESET
    f.wr(CommonCfg.STATUS, 1, 0)
    assert f.status() == 0  # until the driver resets it


def test_the_pci_cfg_window_reads_and_writes_bar0(f: Function) -> None:
    pos = vendor_caps(f)[5][0]
    f.set_cfg(pos + 4, 1, 0)  # bar
    f.set_cfg(pos + 8, 4, vp.DEVICE_OFFSET + 20)  # offset of blk_size
    f.set_cfg(pos + 12, 4, 4)  # length
    assert f.cfg(pos + 16, 4) == 512
    f.set_cfg(pos + 8, 4, CommonCfg.Q_SIZE)
    f.set_cfg(pos + 12, 4, 2)
    f.set_cfg(pos + 16, 2, 32)
    assert f.rd(CommonCfg.Q_SIZE, 2) == 32
    f.set_cfg(pos + 12, 4, 3)  # not 1, 2 or 4: no access
    assert f.cfg(pos + 16, 4) == 32


def test_a_read_only_image_is_offered_ro_and_no_discard(tmp_path: Path) -> None:
    (tmp_path / "fn.img").write_bytes(bytes(4096))
    fn = Function(tmp_path, read_only=True)
    fn.wr(CommonCfg.DFSELECT, 4, 0)
    features = fn.rd(CommonCfg.DF, 4)
    assert features & 1 << BlkFeature.F_RO and not features & 1 << BlkFeature.F_DISCARD
    assert fn.fn.device.size == 4096
    fn.fn.close()
    fn.driver.close()


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="blk_size"):
        BlkOptions("x", blk_size=300)
    with pytest.raises(ValueError, match="multiple of 512"):
        BlkOptions("x", size=1000)
    with pytest.raises(FileNotFoundError):
        blk_function(SID, BlkOptions(str(tmp_path / "none.img"), read_only=True),
                     FakeTranslator(None))


def test_the_common_layout_offsets_are_the_structs(f: Function) -> None:
    layout = hw.virtio_pci_common_layout()
    names = {"DFSELECT": "device_feature_select", "DF": "device_feature",
             "GFSELECT": "guest_feature_select", "GF": "guest_feature", "MSIX": "msix_config",
             "NUMQ": "num_queues", "STATUS": "device_status",
             "CFGGENERATION": "config_generation", "Q_SELECT": "queue_select",
             "Q_SIZE": "queue_size", "Q_MSIX": "queue_msix_vector", "Q_ENABLE": "queue_enable",
             "Q_NOFF": "queue_notify_off", "Q_DESCLO": "queue_desc_lo",
             "Q_DESCHI": "queue_desc_hi", "Q_AVAILLO": "queue_avail_lo",
             "Q_AVAILHI": "queue_avail_hi", "Q_USEDLO": "queue_used_lo",
             "Q_USEDHI": "queue_used_hi", "Q_NDATA": "queue_notify_data",
             "Q_RESET": "queue_reset", "ADM_Q_IDX": "admin_queue_index",
             "ADM_Q_NUM": "admin_queue_num"}
    assert {name: int(CommonCfg[name]) for name in names} == {
        name: layout[field] for name, field in names.items()}


# --- INTx instead of MSI-X ----------------------------------------------------------------------


@pytest.fixture
def intx(tmp_path: Path) -> Iterator[Function]:
    fn = Function(tmp_path, msix=False)
    yield fn
    fn.fn.close()
    fn.driver.close()


def test_without_msix_the_function_has_inta_maskable_and_automasked(intx: Function) -> None:
    assert intx.cfg(PCI_INTERRUPT_PIN, 1) == 1 and intx.fn.config.msix_offset == 0
    assert intx.fn.irq_info(PciIrq.INTX) == (1 | 2 | 4, 1)  # EVENTFD, MASKABLE, AUTOMASKED
    assert intx.fn.irq_info(PciIrq.MSIX)[1] == 0 and intx.fn.region_info(2) == (0, 0)
    intx.wr(CommonCfg.MSIX, 2, 0)
    assert intx.rd(CommonCfg.MSIX, 2) == NO_VECTOR  # no vectors without MSI-X


def test_intx_fires_once_then_again_after_unmask_only_while_the_isr_is_set(
        intx: Function) -> None:
    intx.probe(msix=False)
    intx.setup_queue()
    d, client = intx.driver, intx.client
    d.request(T_OUT, 0, data=pattern(0, 512))
    intx.kick()
    assert client.interrupts == [(PciIrq.INTX, 0)]
    assert intx.cfg(6, 2) & 0x8  # PCI_STATUS: Interrupt Status
    d.request(T_OUT, 0, data=pattern(0, 512))
    intx.kick()
    assert len(client.interrupts) == 1  # automasked: no second edge before the unmask
    intx.fn.irq_mask(PciIrq.INTX, [(0, False)])  # QEMU's EOI, sent before the ISR read
    assert intx.rd(vp.ISR_OFFSET, 1) == hw.VIRTIO_PCI_ISR_QUEUE
    assert len(client.interrupts) == 1  # the ISR read cleared the line: nothing to resend
    assert not intx.cfg(6, 2) & 0x8
    d.request(T_OUT, 0, data=pattern(0, 512))
    intx.kick()
    assert len(client.interrupts) == 2
    intx.fn.irq_mask(PciIrq.INTX, [(0, False)])
    intx.rd(CommonCfg.STATUS, 1)  # another access: the ISR is still set, so again
    assert len(client.interrupts) == 3


def test_intx_disable_in_the_command_register_holds_the_line(intx: Function) -> None:
    intx.probe(msix=False)
    intx.setup_queue()
    intx.set_cfg(PCI_COMMAND, 2, PCI_COMMAND_MASTER | 2 | 0x400)
    intx.driver.request(T_OUT, 0, data=pattern(0, 512))
    intx.kick()
    assert intx.client.interrupts == [] and intx.rd(vp.ISR_OFFSET, 1) == 1


def test_set_irqs_mask_and_unmask_of_intx_reach_the_function_over_vfio_user(
        intx: Function) -> None:
    """QEMU's INTx: an eventfd to TRIGGER, then UNMASK (DATA_NONE) at each EOI; KVM's
    resample eventfd (DATA_EVENTFD with UNMASK) is refused, and QEMU then sends UNMASK."""
    import os
    import socket

    from viommu.transport.vfio_user import messages as m
    from viommu.transport.vfio_user.connection import VfioUserConnection

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = VfioUserConnection(theirs, intx.fn)

    def ask(command: int, payload: bytes, fds: tuple[int, ...] = ()) -> int:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        ours.sendmsg([m.pack_request(1, command, payload)], anc if fds else [])
        conn.on_readable()
        header = m.HEADER.unpack(ours.recv(m.HEADER.size))
        ours.recv(65536) if header[2] > m.HEADER.size else None
        return header[4] if header[3] & m.VFIO_USER_ERROR else 0

    none = m.VFIO_IRQ_SET_DATA_NONE
    ask(m.Command.VERSION, struct.pack("<HH", 0, 0))
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    trigger = m.IrqSet(20, m.VFIO_IRQ_SET_DATA_EVENTFD | m.VFIO_IRQ_SET_ACTION_TRIGGER,
                       PciIrq.INTX, 0, 1)
    assert ask(m.Command.DEVICE_SET_IRQS, trigger.pack(), (efd,)) == 0
    intx.fn.intx_masked = True
    unmask = m.IrqSet(20, none | m.VFIO_IRQ_SET_ACTION_UNMASK, PciIrq.INTX, 0, 1)
    assert ask(m.Command.DEVICE_SET_IRQS, unmask.pack()) == 0 and not intx.fn.intx_masked
    mask = m.IrqSet(20, none | m.VFIO_IRQ_SET_ACTION_MASK, PciIrq.INTX, 0, 1)
    assert ask(m.Command.DEVICE_SET_IRQS, mask.pack()) == 0 and intx.fn.intx_masked
    resample = m.IrqSet(20, m.VFIO_IRQ_SET_DATA_EVENTFD | m.VFIO_IRQ_SET_ACTION_UNMASK,
                        PciIrq.INTX, 0, 1)
    other = os.eventfd(0)
    assert ask(m.Command.DEVICE_SET_IRQS, resample.pack(), (other,)) == errno.ENOTSUP
    msix_mask = m.IrqSet(20, none | m.VFIO_IRQ_SET_ACTION_MASK, PciIrq.MSIX, 0, 1)
    assert ask(m.Command.DEVICE_SET_IRQS, msix_mask.pack()) == errno.EINVAL
    conn.close()
    ours.close()
    os.close(other)


def test_before_the_viommu_driver_starts_dma_is_untranslated_through_the_client_memory(
        tmp_path: Path) -> None:
    """Firmware (SeaBIOS) drives the disk before the guest's virtio-iommu driver starts
    the vIOMMU: no memory table, nothing to translate with. The disk then reads and writes
    the RAM the vfio-user client mapped, untranslated (as QEMU's boot-bypass)."""
    import mmap
    import os

    from viommu.transport.vfio_user.dma import DmaMemory

    gpa, size = 0x10_0000, 0x10_000
    ram_fd = os.memfd_create("firmware-ram")
    os.ftruncate(ram_fd, size)
    memory = DmaMemory(4)
    memory.add(gpa, size, 3, ram_fd, 0)
    ram = mmap.mmap(ram_fd, size)
    desc, avail, used, hdr, data, status = (gpa + off for off in (0, 0x1000, 0x2000, 0x3000,
                                                                  0x4000, 0x5000))
    ram[0x3000:0x3010] = struct.pack("<IIQ", 1, 0, 2)  # OUT, sector 2
    ram[0x4000:0x4200] = pattern(2, 512)
    for i, (addr, length, flags, nxt) in enumerate([(hdr, 16, 1, 1), (data, 512, 1, 2),
                                                    (status, 1, 2, 0)]):
        ram[16 * i:16 * i + 16] = struct.pack("<QIHH", addr, length, flags, nxt)
    ram[0x1004:0x1006] = b"\0\0"
    ram[0x1002:0x1004] = b"\1\0"
    fn = blk_function(SID, BlkOptions(str(tmp_path / "fw.img"), size=1 << 20, msix=False),
                      FakeTranslator(None))
    fn.connected(type("Client", (), {"memory": memory,
                                     "interrupt": lambda self, i, v=0: True})())
    f = fn.region_write
    f(PciRegion.CONFIG, PCI_COMMAND, (PCI_COMMAND_MASTER | 2).to_bytes(2, "little"))
    f(PciRegion.BAR0, CommonCfg.STATUS, bytes([ACK | DRIVER]))
    for select, word in ((0, ALL & 0xFFFF_FFFF), (1, ALL >> 32)):
        f(PciRegion.BAR0, CommonCfg.GFSELECT, select.to_bytes(4, "little"))
        f(PciRegion.BAR0, CommonCfg.GF, word.to_bytes(4, "little"))
    f(PciRegion.BAR0, CommonCfg.STATUS, bytes([ACK | DRIVER | FEATURES_OK]))
    f(PciRegion.BAR0, CommonCfg.Q_SIZE, (16).to_bytes(2, "little"))
    for offset, value in ((CommonCfg.Q_DESCLO, desc), (CommonCfg.Q_AVAILLO, avail),
                          (CommonCfg.Q_USEDLO, used)):
        f(PciRegion.BAR0, offset, value.to_bytes(8, "little"))
    f(PciRegion.BAR0, CommonCfg.Q_ENABLE, (1).to_bytes(2, "little"))
    f(PciRegion.BAR0, CommonCfg.STATUS, bytes([ACK | DRIVER | FEATURES_OK | DRIVER_OK]))
    assert ram[0x5000] == 0 and ram[0x2002:0x2004] == b"\1\0"  # served at DRIVER_OK
    assert (tmp_path / "fw.img").read_bytes()[1024:1536] == pattern(2, 512)
    memory.clear()  # the mapping is not held: DMA_UNMAP can close it
    fn.close()
    ram.close()
    os.close(ram_fd)
