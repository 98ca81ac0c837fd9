"""pytest plugin (entry point `viommu`): a booted guest shared by a session's tests.

`viommu_vm` boots one Machine per session (profile from --viommu-profile). The `guest`
fixture hands it to a test and, when the test fails, attaches the console output of that
test to the report and keeps the VM's logs (QEMU, console, backend trace) under
test-logs/; logs of a session without failures are removed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from viommu.machine import Machine
from viommu.paths import ROOT

_FAILED_KEY = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("viommu")
    group.addoption("--viommu-profile", default="default",
                    help="machine profile (qemu-configs/NAME.toml) for the shared test guest")
    group.addoption("--viommu-logs", default=str(ROOT / "test-logs"),
                    help="where logs of VMs with failed tests are kept")


@pytest.fixture(scope="session")
def viommu_vm(request: pytest.FixtureRequest) -> Iterator[Machine]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(request.config.getoption("--viommu-logs")) / f"{stamp}-session"
    machine = Machine(request.config.getoption("--viommu-profile"), workdir=workdir,
                      name="session")
    machine.launch()
    request.config.stash[_FAILED_KEY] = False
    yield machine
    machine.shutdown()
    if request.config.stash.get(_FAILED_KEY, False):
        print(f"\nviommu: logs of the shared guest kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def guest(viommu_vm: Machine, request: pytest.FixtureRequest) -> Iterator[Machine]:
    """The shared guest; the console output of this test is reported if it fails."""
    request.node.viommu_console_mark = viommu_vm.mark()
    request.node.viommu_machine = viommu_vm
    yield viommu_vm


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    machine = getattr(item, "viommu_machine", None)
    if machine is None or not report.failed:
        return
    item.config.stash[_FAILED_KEY] = True
    console = machine.console
    if console is not None:
        excerpt = console.transcript[item.viommu_console_mark:][-6000:]
        report.sections.append(("guest console during this test", excerpt))
    report.sections.append(("viommu logs", str(machine.workdir)))
