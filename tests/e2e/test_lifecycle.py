"""Guest lifecycle against the real QEMU: a guest reboot resets the device (QEMU sends no
RESET_DEVICE; the rings restart at base 0), a VM stop/cont does not."""

from __future__ import annotations

import re

from viommu.vm.machine import Machine

EP = 0x100


def test_stop_and_cont_keep_the_device_state(guest: Machine) -> None:
    before = guest.backend("query-status")
    domains = guest.backend("query-domains")
    guest.qmp("stop")
    guest.qmp("cont")
    assert guest.run("true").status == 0
    after = guest.backend("query-status")
    assert after["resets"] == before["resets"]
    assert guest.backend("query-domains") == domains


def test_guest_reboot_resets_the_device_and_the_driver_attaches_again(guest: Machine) -> None:
    before = guest.backend("query-status")
    seq_before = guest.backend("query-requests", limit=1)["trace"][-1]["seq"]
    guest.reboot()
    after = guest.backend("query-status")
    assert after["resets"] == before["resets"] + 1
    if not guest.guest_kernel.attaches_at_registration:  # 6.12: attached at driver bind
        guest.run("viommu-vfio bind 0000:01:00.0").check()
    new = [e for e in guest.backend("query-requests", limit=1000)["trace"]
           if e["seq"] > seq_before]
    assert [e["type"] for e in new if e.get("endpoint") == EP][:2] == ["PROBE", "ATTACH"]
    assert all(e["status"] == "S_OK" for e in new)
    [endpoint] = [e for e in guest.backend("query-endpoints") if e["endpoint"] == EP]
    assert endpoint["mode"] == "translated" and endpoint["config_fault"] is None
    mark = guest.mark()
    guest.inject("C_BAD_STE", EP)
    guest.wait_line(rf"virtio_iommu virtio\d+: {re.escape(f'unknown fault from EP {EP}')}$",
                    since=mark)
