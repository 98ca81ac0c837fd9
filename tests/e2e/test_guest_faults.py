"""End to end: a real guest under QEMU, its unmodified virtio_iommu driver bound to our
out-of-process device, and the guest's reaction to each injected SMMUv3 event.

One guest is booted for the session (the `guest` fixture). Linux rate-limits its fault
lines to 10 per 5 s, so the single-event tests stay under that and the burst test, which waits
for a fresh window, comes last.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from viommu.vm.machine import Machine

EP = 0x100  # pci-testdev on the first root port: 01:00.0


def fault_line(text: str) -> str:
    return rf"virtio_iommu virtio\d+: {re.escape(text)}$"


def test_guest_driver_binds_to_the_out_of_process_device(guest: Machine) -> None:
    dmesg = guest.run("dmesg").check().output
    assert re.search(r"virtio_iommu virtio\d+: input address: 48 bits", dmesg)
    assert re.search(r"virtio_iommu virtio\d+: page mask: 0xfffffffffffff000", dmesg)
    driver = guest.run("basename $(readlink /sys/bus/virtio/devices/virtio0/driver)").check()
    assert driver.output.strip() == "virtio_iommu"


def endpoint_requests(guest: Machine) -> tuple[list[dict], list[dict]]:
    trace = guest.backend("query-requests", limit=1000)["trace"]
    return ([e for e in trace if e["type"] == "PROBE" and e["endpoint"] == EP],
            [e for e in trace if e["type"] == "ATTACH" and e["endpoint"] == EP])


def test_endpoint_joins_its_iommu_group_when_the_kernel_attaches_it(guest: Machine) -> None:
    """7.x attaches every endpoint when the IOMMU registers; 6.12 only once a driver binds
    it (viommu.vm.guest_kernel). The driverless pci-testdev shows which: without a group on
    6.12 until vfio-pci binds it, then in one."""
    group = "ls /sys/bus/pci/devices/0000:01:00.0/iommu_group/devices"
    if not guest.guest_kernel.attaches_at_registration:
        assert guest.run(group).status != 0, "6.12-style kernel: no group before a driver"
        assert endpoint_requests(guest) == ([], [])
        guest.run("viommu-vfio bind 0000:01:00.0").check()
    assert guest.run(group).check().output.split() == ["0000:01:00.0"]


def test_backend_received_probe_and_attach_for_the_endpoint(guest: Machine) -> None:
    if not guest.guest_kernel.attaches_at_registration:
        guest.run("test -e /sys/bus/pci/devices/0000:01:00.0/iommu_group "
                  "|| viommu-vfio bind 0000:01:00.0").check()  # a driver makes it attach
    probes, attaches = endpoint_requests(guest)
    assert probes and probes[0]["status"] == "S_OK"
    assert attaches and attaches[-1]["status"] == "S_OK"
    [endpoint] = [e for e in guest.backend("query-endpoints") if e["endpoint"] == EP]
    assert endpoint["endpoint"] == EP and endpoint["mode"] == "translated"
    assert endpoint["domain"] == attaches[-1]["domain"]


def test_guest_shell_reports_exit_status(guest: Machine) -> None:
    assert guest.run("true").status == 0
    assert guest.run("exit_with() { return $1; }; exit_with 7").status == 7


@pytest.mark.parametrize("event,args,line", [
    ("C_BAD_STE", {}, f"unknown fault from EP {EP}"),
    ("C_BAD_CD", {"ssid": 1}, f"unknown fault from EP {EP}"),
    ("C_BAD_SUBSTREAMID", {"ssid": 0xFFFFF}, f"unknown fault from EP {EP}"),
    ("F_STREAM_DISABLED", {}, f"domain fault from EP {EP}"),
    ("F_TRANSLATION", {"address": 0x10000, "access": "read"},
     f"page fault from EP {EP} at 0x10000 [R]"),
    ("F_TRANSLATION", {"address": 0xABC000, "access": "write"},
     f"page fault from EP {EP} at 0xabc000 [W]"),
    ("F_PERMISSION", {"address": 0x7000, "access": "write"},
     f"page fault from EP {EP} at 0x7000 [W]"),
], ids=["C_BAD_STE", "C_BAD_CD", "C_BAD_SUBSTREAMID", "F_STREAM_DISABLED",
        "F_TRANSLATION-read", "F_TRANSLATION-write", "F_PERMISSION"])
def test_injected_event_produces_the_exact_guest_line(
        guest: Machine, inject: Callable[..., dict], expect_guest_line: Callable[..., str],
        event: str, args: dict, line: str) -> None:
    mark = guest.mark()
    reply = inject(event, EP, **args)
    assert reply["delivered"] == 1
    expect_guest_line(fault_line(line))
    time.sleep(0.3)  # one event, one line: nothing else may follow
    [printed] = guest.fault_lines(mark)
    assert re.fullmatch(fault_line(line).rstrip("$"), printed)


def test_injected_event_goes_out_through_the_event_thread(
        guest: Machine, inject: Callable[..., dict]) -> None:
    before = guest.backend("query-status")["event_thread"]
    reply = inject("F_TRANSLATION", EP, address=0x20000)
    assert reply["delivered"] == 1
    after = guest.backend("query-status")["event_thread"]
    assert after["delivered_by_thread"] == before["delivered_by_thread"] + 1
    [entry] = guest.backend("query-events", since=reply["seq"] - 1, limit=1)["trace"]
    assert entry["state"] == "delivered" and entry["delivery_us"] > 0


def test_injected_config_event_marks_the_stream_faulted(guest: Machine) -> None:
    guest.inject("C_BAD_STE", EP)
    [endpoint] = [e for e in guest.backend("query-endpoints") if e["endpoint"] == EP]
    assert endpoint["config_fault"] == "C_BAD_STE"


def test_burst_of_40_events_is_all_delivered_while_the_guest_prints_at_most_10(
        guest: Machine) -> None:
    guest.wait_fault_window()  # the earlier tests' lines may have used up this window
    before = guest.backend("query-events", limit=0)
    mark = guest.mark()
    reply = guest.inject("F_TRANSLATION", EP, address=0x40000, count=40)
    assert reply["delivered"] == 40
    after = guest.backend("query-events", limit=0)
    assert after["delivered"] - before["delivered"] == 40
    assert after["lost"] == before["lost"] and after["pending"] == 0
    guest.wait_line(fault_line(f"page fault from EP {EP} at 0x40000 [R]"), since=mark)
    time.sleep(2)
    printed = [ln for ln in guest.fault_lines(mark) if "at 0x40000" in ln]
    assert 1 <= len(printed) <= 10
