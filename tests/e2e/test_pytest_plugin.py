"""The pytest plugin from the outside (pytester): a pytest run with --junitxml and two
pytest-xdist workers, so two VMs boot side by side (one each) in one inner run. A failing
test's junit XML carries its console excerpt and backend trace; the workers' VMs share no
name, process or socket."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from viommu.provision.cache import cache_root

pytest_plugins = ["pytester"]
# Pytester gives the inner run a HOME of its own: it must find the same QEMU and guest image.
CACHE = cache_root()

# Four tests: xdist's load scheduling sends them round-robin, two to each worker.
INNER_TESTS = r'''
import pytest


@pytest.fixture(autouse=True)
def which_vm(guest, record_property):
    record_property("vm", f"{guest.name} pid={guest.qemu_pid} {guest.control_socket}")


def test_injected_fault_reaches_the_guest(inject, expect_guest_line):
    assert inject("C_BAD_STE", 0x100)["delivered"] == 1
    expect_guest_line(r"virtio_iommu virtio\d+: unknown fault from EP 256$")


def test_a_hot_plugged_endpoint_gets_an_iommu_group(guest, dma_endpoint):
    assert guest.run(f"test -e /sys/bus/pci/devices/{dma_endpoint.sysfs_name}/iommu_group"
                     ).status == 0


def test_that_fails(guest, inject):
    guest.run("echo marker-of-the-failing-test").check()
    inject("F_TRANSLATION", address=0x7000, access="write")
    assert False, "deliberately"


def test_lines_from_before_the_test_do_not_count(expect_guest_line):
    with pytest.raises(Exception, match="no console line matched"):
        expect_guest_line("marker-of-the-failing-test", timeout=0.5)
'''


def test_junit_report_and_two_xdist_workers_each_with_its_own_vm(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIOMMU_CACHE", str(CACHE))
    pytester.makepyfile(test_inner=INNER_TESTS)
    logs = pytester.path / "vm-logs"
    result = pytester.runpytest_subprocess(
        "-n", "2", "--junitxml=junit.xml", f"--viommu-logs={logs}", "-p", "no:cacheprovider",
        timeout=600)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*viommu: guest console during this test*",
                                 "*marker-of-the-failing-test*"])

    cases = {case.get("name"): case for case in
             ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")}
    failed = {p.get("name"): p.get("value") for p in cases["test_that_fails"].iter("property")}
    assert "marker-of-the-failing-test" in failed["viommu guest console during this test"]
    assert "F_TRANSLATION sid=0x100" in failed["viommu backend trace during this test"]
    assert "viommu qemu log (tail)" in failed

    vms = {p.get("value") for case in cases.values() for p in case.iter("property")
           if p.get("name") == "vm"}
    names, pids, sockets = zip(*(vm.split() for vm in vms), strict=True)
    assert sorted(names) == ["session-gw0", "session-gw1"]
    assert len(set(pids)) == 2 and len(set(sockets)) == 2
