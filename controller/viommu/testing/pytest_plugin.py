"""pytest plugin (entry point `viommu`): booted guests for tests, and what a failed test
leaves in its report.

Fixtures:
- `viommu_vm` (session): one booted Machine for the session; under pytest-xdist one per
  worker, each with its own name, sockets and logs (`--viommu-profile` picks the profile).
- `guest`: that Machine, for one test.
- `inject`: `inject(event, sid=None, **fields)` injects an SMMUv3 event (default stream: the
  profile's first endpoint) and returns the backend's answer.
- `expect_guest_line`: `expect_guest_line(pattern, timeout=20)` waits for a console line
  printed after the test started, and returns it.
- `dma_endpoint`: a DMA endpoint hot-plugged for one test and removed after; the marker
  `@pytest.mark.viommu_endpoint(port=N, pri=True, vfio=True)` chooses how.

When a test that used `guest` fails, its report gets the console output of that test, the
backend's trace entries since the test started and the tail of QEMU's log: as report
sections (shown by pytest) and as properties (in --junitxml output). The VM's logs are kept
under test-logs/; those of a session without failures are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from viommu.cli.tracing import TraceFollower, format_entry
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.machine import Machine

CONSOLE_EXCERPT = 6000  # characters of console output in a report
QEMU_LOG_LINES = 40
_FAILED_KEY = pytest.StashKey[bool]()
_RECORD_KEY = pytest.StashKey["GuestRecord"]()
# Root ports holding an endpoint plugged by this plugin, per machine.
_PLUGGED: weakref.WeakKeyDictionary[Machine, set[int]] = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class GuestRecord:
    """What a test did to its guest, for its report should it fail."""

    machine: Machine
    console_mark: int
    trace: TraceFollower | None
    injected: list[str] = dataclasses.field(default_factory=list)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("viommu")
    group.addoption("--viommu-profile", default="default",
                    help="machine profile (qemu-configs/NAME.toml) for the shared test guest")
    group.addoption("--viommu-logs", default=None,
                    help="where logs of VMs with failed tests are kept (default: test-logs/ "
                         "in the directory pytest runs from)")
    group.addoption("--viommu-kernel", default=None, metavar="SPEC",
                    help="guest kernel of the test VMs: a Debian series (7, 6.12), a kernel "
                         "build tree or an image (default: VIOMMU_KERNEL, else 7)")
    group.addoption("--viommu-arch", default=None, choices=("x86_64", "aarch64"),
                    help="guest architecture of the test VMs (default: VIOMMU_ARCH, else "
                         "x86_64)")


def guest_choice(config: pytest.Config) -> dict:
    """The kernel and architecture this run's VMs boot: the options, else the environment
    (Machine reads VIOMMU_KERNEL and VIOMMU_ARCH itself)."""
    return {"kernel": config.getoption("--viommu-kernel"),
            "arch": config.getoption("--viommu-arch")}


def pytest_report_header(config: pytest.Config) -> list[str]:
    """What the VMs of this run boot, exactly: reports must say which kernel was tested."""
    from viommu.vm.boot import describe_choice

    choice = guest_choice(config)
    return [f"viommu: {describe_choice(config.getoption('--viommu-profile'), **choice)}"]


def pytest_configure(config: pytest.Config) -> None:
    # Every VM of the run follows the choice, the plugin's and those tests make themselves,
    # in this process and in the processes it starts (`viommu up`, xdist workers).
    for option, variable in (("--viommu-kernel", "VIOMMU_KERNEL"),
                             ("--viommu-arch", "VIOMMU_ARCH")):
        if config.getoption(option):
            os.environ[variable] = config.getoption(option)
    config.addinivalue_line(
        "markers", "viommu_endpoint(port=None, pri=False, vfio=False, name=None): how the "
        "dma_endpoint fixture plugs its endpoint")


def worker_name(config: pytest.Config) -> str:
    """pytest-xdist's worker id (gw0, gw1, ...), or "main" without xdist."""
    return getattr(config, "workerinput", {}).get("workerid", "main")


@pytest.fixture(scope="session")
def viommu_vm(request: pytest.FixtureRequest) -> Iterator[Machine]:
    worker = worker_name(request.config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = request.config.getoption("--viommu-logs") or request.config.rootpath / "test-logs"
    workdir = Path(logs) / f"{stamp}-{worker}"
    machine = Machine(request.config.getoption("--viommu-profile"), workdir=workdir,
                      name=f"session-{worker}", **guest_choice(request.config))
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
    """The shared guest; what this test did to it is reported if it fails."""
    trace = TraceFollower(viommu_vm.backend) if viommu_vm.profile.iommu == "viommu" else None
    request.node.stash[_RECORD_KEY] = GuestRecord(viommu_vm, viommu_vm.mark(), trace)
    yield viommu_vm


@pytest.fixture
def inject(guest: Machine, request: pytest.FixtureRequest) -> Callable[..., dict]:
    """inject(event, sid=None, **fields) -> the backend's answer (delivered, guest_line...)."""
    record = request.node.stash[_RECORD_KEY]

    def inject_event(event: str, sid: int | None = None, **fields: object) -> dict:
        reply = guest.inject(event, sid, **fields)
        record.injected.append(f"{event} sid={sid} {fields} -> {reply}")
        return reply

    return inject_event


@pytest.fixture
def expect_guest_line(guest: Machine, request: pytest.FixtureRequest) -> Callable[..., str]:
    """expect_guest_line(pattern, timeout=20) -> the first console line matching `pattern`
    (a regex, multiline) printed since this test started; fails the test otherwise."""
    mark = request.node.stash[_RECORD_KEY].console_mark

    def expect(pattern: str, timeout: float = 20) -> str:
        return guest.wait_line(pattern, timeout, since=mark)

    return expect


@pytest.fixture
def dma_endpoint(guest: Machine, request: pytest.FixtureRequest) -> Iterator[HotpluggedEndpoint]:
    """A DMA endpoint plugged into the guest for this test (a free root port unless the
    viommu_endpoint marker names one), unplugged after."""
    marker = request.node.get_closest_marker("viommu_endpoint")
    options = dict(marker.kwargs) if marker else {}
    with plugged_endpoint(guest, **options) as endpoint:
        yield endpoint


@contextlib.contextmanager
def plugged_endpoint(vm: Machine, port: int | None = None, *, name: str | None = None,
                     pri: bool = False, vfio: bool = False) -> Iterator[HotpluggedEndpoint]:
    """Hot-plug a DMA endpoint (bound to vfio-pci in the guest when `vfio`); unplug it after.
    For module-scoped fixtures as well as the `dma_endpoint` fixture."""
    port = free_root_port(vm) if port is None else port
    endpoint = vm.add_endpoint(port, name, pri=pri)
    _PLUGGED.setdefault(vm, set()).add(port)
    try:
        if vfio:
            vm.run(f"viommu-vfio bind {endpoint.sysfs_name}").check()
        yield endpoint
    finally:
        if vfio:
            vm.run(f"echo {endpoint.sysfs_name} > /sys/bus/pci/drivers/vfio-pci/unbind")
        vm.remove_endpoint(endpoint)
        _PLUGGED[vm].discard(port)


def free_root_port(vm: Machine) -> int:
    """The highest root port without a profile endpoint or one this plugin plugged."""
    taken = {ep.port for ep in vm.profile.endpoints} | _PLUGGED.get(vm, set())
    free = [p for p in range(vm.profile.root_ports) if p not in taken]
    if not free:
        raise pytest.UsageError(f"no free root port on {vm.name}: all "
                                f"{vm.profile.root_ports} hold endpoints")
    return free[-1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    record = item.stash.get(_RECORD_KEY, None)
    if record is None or not report.failed:
        return
    item.config.stash[_FAILED_KEY] = True
    for title, text in failure_sections(record):
        report.sections.append((f"viommu: {title}", text))
        # junitxml writes a report's user_properties as <property> elements.
        report.user_properties.append((f"viommu {title}", text))
        item.user_properties.append((f"viommu {title}", text))


def failure_sections(record: GuestRecord) -> list[tuple[str, str]]:
    machine = record.machine
    sections = []
    if machine.console is not None:
        excerpt = machine.console.transcript[record.console_mark:][-CONSOLE_EXCERPT:]
        sections.append(("guest console during this test", excerpt or "(nothing printed)"))
    if record.injected:
        sections.append(("events injected", "\n".join(record.injected)))
    if record.trace is not None:
        sections.append(("backend trace during this test", _trace_text(record.trace)))
    sections.append(("qemu log (tail)", _tail(machine.workdir / "qemu.log")))
    sections.append(("logs", str(machine.workdir)))
    return sections


def _trace_text(trace: TraceFollower) -> str:
    try:
        return "\n".join(map(format_entry, trace.poll())) or "(no entries)"
    except Exception as exc:  # noqa: BLE001 - the backend may be what failed
        return f"(backend did not answer: {exc})"


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-QEMU_LOG_LINES:]
    except OSError:
        return "(no log)"
    return "\n".join(lines) or "(empty)"
