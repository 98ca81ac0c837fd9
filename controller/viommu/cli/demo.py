"""`viommu demo`: boot a guest behind the vIOMMU, inject events, show the guest's reaction."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
import tempfile
from pathlib import Path

from viommu.vm.console import ConsoleError
from viommu.vm.errors import MachineError
from viommu.vm.machine import Machine
from viommu.vm.paths import SetupMissing


@dataclasses.dataclass(frozen=True)
class Injection:
    label: str
    event_type: str
    args: dict
    # What Linux's virtio-iommu driver prints for it (viommu_fault_handler's format).
    expected: str


def injections(endpoint: int) -> list[Injection]:
    return [
        Injection("C_BAD_STE", "C_BAD_STE", {}, f"unknown fault from EP {endpoint}"),
        Injection("C_BAD_CD (SSID 1)", "C_BAD_CD", {"ssid": 1},
                  f"unknown fault from EP {endpoint}"),
        Injection("F_TRANSLATION read at 0x10000", "F_TRANSLATION",
                  {"address": 0x10000, "access": "read"},
                  f"page fault from EP {endpoint} at 0x10000 [R]"),
    ]


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(profile: str = "default", accel: str = "auto", keep_logs: str | None = None,
             kernel: str | None = None, modules: str | None = None, arch: str | None = None
             ) -> int:
    workdir = Path(keep_logs) if keep_logs else Path(tempfile.mkdtemp(prefix="viommu-demo-"))
    machine = Machine(profile, workdir=workdir, accel=accel, name="demo", kernel=kernel,
                      modules=modules, arch=arch)
    endpoint = machine.endpoint_ids[0]
    results: list[bool] = []
    try:
        boot = machine.prepare()
        _say(f"== booting a {boot.platform.machine.split(',')[0]} guest ({machine.arch}, "
             f"{machine.accel.upper()}) with the viommu virtio-iommu and endpoint {endpoint} "
             f"({endpoint >> 8:02x}:{endpoint >> 3 & 31:02x}.{endpoint & 7})")
        _say(f"   kernel {boot.kernel_description}")
        machine.launch()
        _say(f"   booted in {machine.boot_seconds:.1f} s")
        _show_guest_driver(machine)
        _show_requests(machine)
        _say(f"\n== injecting SMMUv3 events for endpoint {endpoint}")
        for inj in injections(endpoint):
            results.append(_inject_and_check(machine, endpoint, inj))
        counters = machine.backend("query-events", limit=0)
        _say(f"\n== backend event counters: injected {counters['injected']}, delivered "
             f"{counters['delivered']}, pending {counters['pending']}, lost {counters['lost']}")
    except (SetupMissing, MachineError, ConsoleError) as exc:
        _say(f"\nerror: {exc}")
        results.append(False)
    finally:
        _say("\n== shutting down")
        machine.shutdown()
    ok = bool(results) and all(results)
    if ok and not keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
        _say("   done")
    else:
        _say(f"   logs (QEMU, console, backend trace): {workdir}")
    _say(f"\nRESULT: {'PASS' if ok else 'FAIL'} ({sum(results)}/{len(injections(endpoint))} "
         "events produced the expected guest line)")
    return 0 if ok else 1


def _show_guest_driver(machine: Machine) -> None:
    _say("\n== guest: IOMMU driver lines (dmesg)")
    result = machine.run("dmesg | grep -E 'virtio_iommu|iommu group|VIOT'")
    for line in result.output.splitlines():
        _say(f"   {line}")
    group = machine.run("ls /sys/bus/pci/devices/*/iommu_group/devices/ | sort -u")
    _say(f"   devices in IOMMU groups: {' '.join(group.output.split()) or '(none)'}")


def _show_requests(machine: Machine) -> None:
    _say("\n== backend: requests received from the guest driver")
    requests = machine.backend("query-requests", limit=20)
    for entry in requests["trace"]:
        fields = " ".join(f"{k}={_fmt(k, entry[k])}" for k in
                          ("domain", "endpoint", "virt_start", "virt_end", "phys_start", "flags")
                          if k in entry and (entry[k] or k in ("domain", "endpoint")))
        _say(f"   #{entry['seq']:<3} {entry['type']:<7} {fields} -> {entry['status']}")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(requests["counts"].items()))
    _say(f"   totals: {counts or 'none'}")


def _inject_and_check(machine: Machine, endpoint: int, inj: Injection) -> bool:
    mark = machine.mark()
    reply = machine.inject(inj.event_type, endpoint, **inj.args)
    pattern = rf"virtio_iommu virtio\d+: {re.escape(inj.expected)}$"
    try:
        line = machine.wait_line(pattern, timeout=15, since=mark)
    except ConsoleError:
        seen = machine.fault_lines(mark)
        _say(f"   {inj.label:<32} FAIL: expected '{inj.expected}', guest printed "
             f"{seen or 'nothing'} (backend: {reply['delivered']} delivered)")
        return False
    _say(f"   {inj.label:<32} -> guest: {line}   [ok]")
    return True


def _fmt(key: str, value: object) -> str:
    return f"{value:#x}" if key in ("virt_start", "virt_end", "phys_start") else str(value)


if __name__ == "__main__":
    sys.exit(run_demo())
