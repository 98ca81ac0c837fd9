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
- `blk_disk`: a virtio-blk disk hot-plugged for one test and removed after (`.disk` is the
  guest's block device); the marker `@pytest.mark.viommu_disk(size=..., read_only=True)`
  chooses how. `plugged_disk(vm, ...)` is the same for module-scoped fixtures.

When a test that used `guest` fails, its report gets the console output of that test, the
events it injected, the backend's trace entries since the test started and the tail of QEMU's
log: as report sections (shown by pytest) and as properties (in --junitxml output). The VM's
logs are kept under test-logs/; those of a session without failures are removed.

For kernel CI: `--viommu-ktap FILE` writes the results as KTAP (viommu.testing.ktap), and
`--viommu-results DIR` keeps, for every test that used a guest, its console log, backend
trace, QEMU and backend logs and a reproduce.sh (viommu.testing.guest_record), with
results.json and results.ktap for the run (viommu.testing.results).

The plugin is loaded by every pytest run where viommu is installed, so importing it imports
nothing heavy (the VM side is imported by the fixtures), and a fixture that cannot have its
VM (viommu not set up, or not importable) fails its tests with one line saying what to do;
tests that use none of its fixtures run as if it were not there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from viommu import __version__
from viommu.testing.guest_record import GuestRecord, artifact_name
from viommu.testing.outcomes import OutcomeLog
from viommu.testing.reproduce import VmChoice
from viommu.testing.results import ResultsReporter

if TYPE_CHECKING:
    from viommu.vm.hotplug import HotpluggedEndpoint
    from viommu.vm.machine import Machine

_FAILED_KEY = pytest.StashKey[bool]()
_RECORD_KEY = pytest.StashKey[GuestRecord]()
_OUTCOMES_KEY = pytest.StashKey[OutcomeLog]()
# Root ports holding an endpoint plugged by this plugin, per machine.
_PLUGGED: weakref.WeakKeyDictionary[Machine, set[int]] = weakref.WeakKeyDictionary()


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
    group.addoption("--viommu-ktap", default=None, metavar="FILE",
                    help="write the results as KTAP (what kernel CI reads) to FILE")
    group.addoption("--viommu-results", default=None, metavar="DIR",
                    help="keep every guest test's console log, backend trace, QEMU log and "
                         "reproduce.sh in DIR/<test>/, with results.json and results.ktap")


def guest_choice(config: pytest.Config) -> dict:
    """The kernel and architecture this run's VMs boot: the options, else the environment
    (Machine reads VIOMMU_KERNEL and VIOMMU_ARCH itself)."""
    return {"kernel": config.getoption("--viommu-kernel"),
            "arch": config.getoption("--viommu-arch")}


def pytest_report_header(config: pytest.Config) -> list[str]:
    """What the VMs of this run boot, exactly: reports must say which kernel was tested."""
    return [f"viommu: {describe_guest(config)}"]


def describe_guest(config: pytest.Config) -> str:
    try:
        from viommu.vm.boot import describe_choice

        return describe_choice(config.getoption("--viommu-profile"), **guest_choice(config))
    except Exception as exc:  # noqa: BLE001 - a header must never stop a test run
        return f"cannot say what the guests boot ({type(exc).__name__}: {exc})"


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
    config.addinivalue_line(
        "markers", "viommu_disk(port=None, name=None, image=None, size=None, read_only=False, "
        "indirect=True): how the blk_disk fixture plugs its disk")
    config.stash[_OUTCOMES_KEY] = OutcomeLog()
    ktap, results = config.getoption("--viommu-ktap"), config.getoption("--viommu-results")
    if (ktap or results) and not hasattr(config, "workerinput"):  # xdist's controller
        config.pluginmanager.register(ResultsReporter(
            ktap, results, [f"viommu {__version__}: {describe_guest(config)}"],
            guest_choice(config)), "viommu-results")


def worker_name(config: pytest.Config) -> str:
    """pytest-xdist's worker id (gw0, gw1, ...), or "main" without xdist."""
    return getattr(config, "workerinput", {}).get("workerid", "main")


def _machine_class(config: pytest.Config) -> type[Machine]:
    """Machine, once viommu is set up for the run's architecture; else the test fails with
    one line saying what to do. Only QEMU is looked for: a kernel not fetched yet is fetched
    at first use, as everywhere."""
    try:
        from viommu.provision.arch import get_arch
        from viommu.provision.cache import SetupMissing
        from viommu.provision.qemu import find_qemu
        from viommu.vm.boot import choose_arch
        from viommu.vm.machine import Machine
        from viommu.vm.profile import load_profile
    except ImportError as exc:
        problem = (f"viommu is installed but cannot be imported ({exc}): reinstall it "
                   "(pip install --force-reinstall viommu)")
    else:
        try:
            arch = choose_arch(config.getoption("--viommu-arch"),
                               load_profile(config.getoption("--viommu-profile")))
            find_qemu(get_arch(arch))
            return Machine
        except SetupMissing as exc:
            problem = f"viommu is not set up: {exc}"
        except (ValueError, FileNotFoundError) as exc:  # a bad or unknown profile
            problem = f"viommu: --viommu-profile: {exc}"
    pytest.fail(problem, pytrace=False)  # outside the except: one line, no chained traceback


def logs_root(config: pytest.Config) -> Path:
    """Where VM logs go: --viommu-logs, else test-logs/ in the project pytest runs (its
    rootdir), never in viommu's own checkout or installation."""
    return Path(config.getoption("--viommu-logs") or config.rootpath / "test-logs")


@pytest.fixture(scope="session")
def viommu_vm(request: pytest.FixtureRequest) -> Iterator[Machine]:
    machine_class = _machine_class(request.config)
    worker = worker_name(request.config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = logs_root(request.config) / f"{stamp}-{worker}"
    machine = machine_class(request.config.getoption("--viommu-profile"), workdir=workdir,
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
    """The shared guest; what this test did to it is reported if it fails (and kept with
    --viommu-results)."""
    record = GuestRecord.start(viommu_vm, vm_choice(viommu_vm, request.config))
    request.node.stash[_RECORD_KEY] = record
    with record.recording_injections():
        yield viommu_vm
    if request.config.getoption("--viommu-results"):
        record.take_snapshot()


def vm_choice(machine: Machine, config: pytest.Config) -> VmChoice:
    """What `viommu up` takes to boot this VM again."""
    from viommu.cli.readiness import profile_argument
    from viommu.provision import DEFAULT_KERNEL

    boot = machine.boot
    described = "" if boot is None else (
        f"{machine.arch}, kernel {boot.kernel_description}, {boot.qemu_description}, "
        f"{machine.accel.upper()}")
    modules = machine.kernel_modules
    return VmChoice(profile_argument(config.getoption("--viommu-profile")), machine.arch,
                    machine.kernel_spec or DEFAULT_KERNEL, str(modules) if modules else None,
                    described)


@pytest.fixture
def inject(guest: Machine, request: pytest.FixtureRequest) -> Callable[..., dict]:
    """inject(event, sid=None, **fields) -> the backend's answer (delivered, guest_line...)."""

    def inject_event(event: str, sid: int | None = None, **fields: object) -> dict:
        return guest.inject(event, sid, **fields)

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
    with plugged_endpoint(guest, **_marker_options(request, "viommu_endpoint")) as endpoint:
        yield endpoint


@pytest.fixture
def blk_disk(guest: Machine, request: pytest.FixtureRequest) -> Iterator[HotpluggedEndpoint]:
    """A virtio-blk disk plugged into the guest for this test, unplugged after."""
    with plugged_disk(guest, **_marker_options(request, "viommu_disk")) as disk:
        yield disk


def _marker_options(request: pytest.FixtureRequest, name: str) -> dict:
    marker = request.node.get_closest_marker(name)
    return dict(marker.kwargs) if marker else {}


@contextlib.contextmanager
def plugged_endpoint(vm: Machine, port: int | None = None, *, name: str | None = None,
                     pri: bool = False, vfio: bool = False) -> Iterator[HotpluggedEndpoint]:
    """Hot-plug a DMA endpoint (bound to vfio-pci in the guest when `vfio`); unplug it after.
    For module-scoped fixtures as well as the `dma_endpoint` fixture."""
    with _plugged(vm, port, lambda p: vm.add_endpoint(p, name, pri=pri)) as endpoint:
        if vfio:
            vm.run(f"viommu-vfio bind {endpoint.sysfs_name}").check()
        try:
            yield endpoint
        finally:
            if vfio:
                vm.run(f"echo {endpoint.sysfs_name} > /sys/bus/pci/drivers/vfio-pci/unbind")


@contextlib.contextmanager
def plugged_disk(vm: Machine, port: int | None = None, *, name: str | None = None,
                 **spec: object) -> Iterator[HotpluggedEndpoint]:
    """Hot-plug a virtio-blk disk served by the backend (`spec`: DiskSpec's fields, e.g.
    size, image, read_only); unplug it after."""
    from viommu.vm.disks import DiskSpec  # the VM side loads only when a fixture needs it

    with _plugged(vm, port, lambda p: vm.add_disk(p, DiskSpec(**spec), name)) as disk:
        yield disk


@contextlib.contextmanager
def _plugged(vm: Machine, port: int | None,
             plug: Callable[[int], HotpluggedEndpoint]) -> Iterator[HotpluggedEndpoint]:
    """plug(port) into `port` (a free one if None), and vm.remove_endpoint() after."""
    port = ready_port(vm, port)
    endpoint = plug(port)
    _PLUGGED.setdefault(vm, set()).add(port)
    try:
        yield endpoint
    finally:
        vm.remove_endpoint(endpoint)
        _PLUGGED[vm].discard(port)


def ready_port(vm: Machine, port: int | None) -> int:
    """`port` (a free one if None), able to take a hot-plug now. Where a port takes one
    hot-plug per boot (aarch64's virt: viommu.vm.platforms) and the one wanted has had its
    turn, the guest is rebooted first, provided nothing this plugin plugged is in it: a
    freshly booted guest is the guest every test expects to find."""
    from viommu.vm.hotplug import port_spent  # the VM side loads only when needed

    spent = not _free_ports(vm) if port is None else port_spent(vm, port)
    if spent and not _PLUGGED.get(vm):
        vm.reboot()
    return free_root_port(vm) if port is None else port


def _free_ports(vm: Machine) -> list[int]:
    """Root ports a hot-plug can use now (Machine.fresh_ports) that this plugin did not plug."""
    return [p for p in vm.fresh_ports() if p not in _PLUGGED.get(vm, set())]


def free_root_port(vm: Machine) -> int:
    """The highest root port a hot-plug can use now (Machine.fresh_ports) that this plugin
    did not plug."""
    free = _free_ports(vm)
    if not free:
        raise pytest.UsageError(f"no free root port on {vm.name}: its "
                                f"{vm.profile.root_ports} hold endpoints or, on "
                                f"{vm.arch}, were hot-plugged since boot")
    return free[-1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    record = item.stash.get(_RECORD_KEY, None)
    if record is None:
        return
    if report.failed:
        item.config.stash[_FAILED_KEY] = True
        for title, text in record.failure_sections():
            report.sections.append((f"viommu: {title}", text))
            # junitxml writes a report's user_properties as <property> elements.
            report.user_properties.append((f"viommu {title}", text))
            item.user_properties.append((f"viommu {title}", text))
    done = item.config.stash[_OUTCOMES_KEY].add(report)
    results = item.config.getoption("--viommu-results")
    if done is not None and results:
        record.write_artifacts(Path(results) / artifact_name(item.nodeid), done)
