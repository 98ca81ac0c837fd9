"""A test VM: the viommu backend, QEMU and the guest console in one object.

In the shape of QEMU's python/qemu/machine (QEMUMachine). `launch()` runs small phases:
prepare (directories, VIOT, NIC), start the backend, start QEMU, connect (console, QMP, the
backend's control socket), wait for the guest's shell; one that fails stops what was started
and raises a typed error (viommu.vm.errors). `shutdown()` too: save the backend's trace;
soft (`poweroff -f` in the guest), else hard (QMP quit, SIGTERM, SIGKILL); close the
connections; stop the backend; remove the sockets. Clean-up holds SIGINT, SIGTERM and SIGHUP
until it is done (viommu.vm.signals), so a second Ctrl-C cannot leave processes behind.
When the backend is dead there is no soft way: the guest may be stuck on its IOMMU. The
logs (qemu.log, console.log, backend.log, backend-trace.json) stay in `workdir`. `run()`
executes guest commands, `wait_line()` waits for console lines, `backend()` and `qmp()`
talk to the backend and QEMU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viommu.backend.backend import Backend
from viommu.vm import disks, hotplug, runs
from viommu.vm.accel import detect_accel
from viommu.vm.backend_supervisor import BackendSupervisor, ThreadBackend, supervisor
from viommu.vm.boot import GuestBoot, choose_arch, choose_kernel
from viommu.vm.boot import prepare as prepare_boot
from viommu.vm.console import CommandResult, Console, ConsoleClosed, ConsoleError
from viommu.vm.detached import DetachedMachine
from viommu.vm.devicetree import write_dtb
from viommu.vm.disks import DiskSpec
from viommu.vm.errors import (
    QMP_ERRORS,
    BackendGone,
    BootTimeout,
    MachineError,
    VMLaunchError,
    launch_failure,
)
from viommu.vm.guest import GUEST_FAULT_LINE, GuestShell, wait_fault_window
from viommu.vm.guest_kernel import GuestKernel
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.nic import NicTap
from viommu.vm.platforms import Platform
from viommu.vm.profile import Profile, load_profile
from viommu.vm.qemu_cmdline import QemuCommandLine
from viommu.vm.qemu_process import QemuProcess
from viommu.vm.qmp import QmpChannel
from viommu.vm.signals import deferred_signals
from viommu.vm.viot import build_viot

if TYPE_CHECKING:
    from viommu.vm.network import PrivateNetwork

log = logging.getLogger(__name__)

EXIT_GRACE_S = 15.0  # for a failing QEMU to exit, so that its exit status can be reported


class Machine(DetachedMachine):
    def __init__(self, profile: Profile | str = "default", *, workdir: Path | str | None = None,
                 accel: str = "auto", name: str = "vm", boot_timeout: float = 120,
                 backend_in_process: bool = False, iommu: str | None = None,
                 network: PrivateNetwork | None = None,
                 run_dir: Path | str | None = None, kernel: str | None = None,
                 modules: str | Path | None = None, arch: str | None = None,
                 kernel_args: str = "", backend_args: Sequence[str] = ()) -> None:
        """`iommu` overrides the profile's: "viommu" (ours), "qemu" (QEMU's in-process
        virtio-iommu-pci, to compare against) or "none". `network`: the segment the VM's NIC
        joins (the profile's [network], or its defaults); VMs given the same one can talk.
        A profile with [network] and no `network` gets a segment of its own.
        `backend_in_process`: the backend's loop runs in a thread of this process (handy
        under a debugger), not in its own (where it cannot share our GIL or our crashes).

        `run_dir` makes a detached VM (`viommu up`): QEMU and the backend run in sessions of
        their own and outlive this process; sockets, logs and state.json live in `run_dir`,
        and `Machine.attach(run_dir)` drives the VM again from another process.

        `kernel`: a kernel SPEC (viommu.provision.kernels: a Debian series such as "7" or
        "6.12", a kernel build tree, or an image with `modules`), `arch` the guest
        architecture ("x86_64", "aarch64"); unset, VIOMMU_KERNEL and VIOMMU_ARCH, then the
        profile's, then the defaults decide. Whatever is missing is fetched or built at
        launch, and a kernel lacking an option viommu needs is refused before it boots
        (viommu.vm.boot.KernelRefused). `kernel_args` go after the profile's command line
        (iommu.strict=1, ...); `backend_args` after the backend process's (["--null-device"],
        ["--poll-us", "0"]: benchmarks compare modes with them)."""
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self._profile_ref = profile if isinstance(profile, str) else self.profile.name
        if iommu is not None:
            self.profile = dataclasses.replace(self.profile, iommu=iommu)
        if kernel_args:
            self.profile = dataclasses.replace(self.profile, cmdline_append=" ".join(
                filter(None, (self.profile.cmdline_append, kernel_args))))
        self.arch = choose_arch(arch, self.profile)
        self.kernel_spec = choose_kernel(kernel, self.profile)
        self.kernel_modules = modules or self.profile.kernel_modules
        self.boot: GuestBoot | None = None  # what launch() boots, once prepared
        self.unplugged_ports: set[int] = set()  # root ports hot-unplugged since boot
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._nic = NicTap(self.profile.network, network)
        self.accel = detect_accel() if accel == "auto" else accel
        self.name = name
        self.boot_timeout = boot_timeout
        self.backend_in_process = backend_in_process
        self.backend_args = list(backend_args)
        self.workdir = Path(workdir or self.run_dir or tempfile.mkdtemp(prefix=f"viommu-{name}-"))
        # Unix socket paths are limited to ~107 bytes: keep them in a short private dir.
        self._sockdir = self.run_dir or Path(tempfile.mkdtemp(prefix="viommu-"))
        self._sockets = {name: str(self._sockdir / f"{name}.sock")
                         for name in ("vhost-user", "control", "qmp", "serial")}
        self.vhost_socket = self._sockets["vhost-user"]
        self.control_socket = self._sockets["control"]
        self._viot = self.workdir / "viot.bin"
        self._dtb = self.workdir / "virt.dtb"
        self._backend: BackendSupervisor | None = None
        self._control = QmpChannel(self.control_socket, "backend")
        self._qemu = QemuProcess(
            name=name, serial_socket=self._sockets["serial"], qmp_socket=self._sockets["qmp"],
            log_path=self.workdir / "qemu.log", console_log=self.workdir / "console.log",
            detached=self.run_dir is not None)
        self._shell = GuestShell(self._qemu, name)
        self.boot_seconds: float | None = None

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def network(self) -> PrivateNetwork | None:
        """The segment the VM's NIC is on (None without a NIC, or before launch makes it)."""
        return self._nic.network

    @property
    def qemu_pid(self) -> int | None:
        return self._qemu.pid

    @property
    def console(self) -> Console | None:
        """The guest's serial console, while connected."""
        return self._qemu.console

    @property
    def backend_pid(self) -> int:
        """The backend's process; this one when the backend runs in a thread here."""
        pid = self._backend.pid if self._backend is not None else None
        return pid if pid is not None else os.getpid()

    def backend_exit_status(self, timeout: float) -> int | None:
        """Wait for the backend process to end; its exit status, or None if it did not."""
        return self._backend.exit_status(timeout) if self._backend is not None else None

    @property
    def inprocess_backend(self) -> Backend | None:
        """The running Backend, when it runs in a thread of this process."""
        running = isinstance(self._backend, ThreadBackend) and self._backend.alive()
        return self._backend.backend if running else None

    @property
    def endpoint_ids(self) -> list[int]:
        return [self.profile.endpoint_id(ep) for ep in self.profile.endpoints]

    @property
    def guest_kernel(self) -> GuestKernel:
        """What the guest's kernel does that others do not (viommu.vm.guest_kernel)."""
        return self._prepared().guest

    @property
    def platform(self) -> Platform:
        """The machine the guest runs on (viommu.vm.platforms)."""
        return self._prepared().platform

    def fresh_ports(self) -> list[int]:
        """Root ports without a profile endpoint that a hot-plug can use now."""
        taken = {ep.port for ep in self.profile.endpoints}
        return [p for p in range(self.profile.root_ports)
                if p not in taken and not hotplug.port_spent(self, p)]

    @property
    def table_area(self) -> tuple[int, int]:
        """(guest-physical base, size) of the RAM reserved from the guest kernel for tables
        tests write: the profile's offset into the platform's RAM."""
        return (self._prepared().platform.ram_base + self.profile.table_area_base,
                self.profile.table_area_size)

    def prepare(self) -> GuestBoot:
        """Decide and provide what boots (QEMU, the kernel and its initramfs, fetched or
        built on first use), and check the kernel's configuration; launch() does this first
        if nobody did. KernelRefused or SetupMissing say what to do."""
        return self._prepared()

    def _prepared(self) -> GuestBoot:
        if self.boot is None:
            self.boot = prepare_boot(self.profile, self.arch, self.kernel_spec,
                                     self.kernel_modules, self._features())
        return self.boot

    def _features(self) -> list[str]:
        """What this VM's profile uses beyond the basics (kconfig feature names)."""
        return (["network"] if self.profile.network is not None else []) + (
            ["virtio-blk"] if disks.profile_disks(self.profile) else [])

    # --- launch -------------------------------------------------------------------------------

    def launch(self) -> None:
        """Start the backend and QEMU and wait for the guest's shell. On failure what was
        started is stopped, and BackendLaunchError, VMLaunchError or BootTimeout says why."""
        started = time.monotonic()
        try:
            self._prepare()
            self._save_run_state("starting")  # seen by `viommu ls` before anything starts
            self._start_backend()
            self._save_run_state("starting")
            self._start_qemu()
            self._save_run_state("starting")
            self._connect()
            self._wait_for_boot()
            self.boot_seconds = time.monotonic() - started
            self._save_run_state("running")
        except BaseException:
            with deferred_signals():  # a second Ctrl-C must not stop the clean-up
                self.shutdown(hard=True)  # no guest shell to power it off
            raise
        log.info("%s booted in %.1f s (%s)", self.name, self.boot_seconds, self.accel)

    def _prepare(self) -> None:
        """What boots (QEMU, kernel, initramfs, checked), the work directory, the private
        socket directory, the VIOT or the device tree, and the NIC's tap."""
        boot = self._prepared()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._sockdir, 0o700)
        if self.profile.iommu == "viommu" and boot.platform.topology == "viot":
            self._viot.write_bytes(build_viot(self.profile.iommu_bdf, self.profile.viot_ranges()))
        elif self.profile.iommu == "viommu":
            write_dtb(self._command_line().dump_dtb_command(self._dtb.with_suffix(".qemu.dtb")),
                      self._dtb, self.profile.iommu_bdf, self.profile.viot_ranges(),
                      self.table_area)
        self._nic.nic()

    def _start_backend(self) -> None:
        if self.profile.iommu != "viommu":
            return
        self._backend = supervisor(
            in_process=self.backend_in_process, vhost_socket=self.vhost_socket,
            control_socket=self.control_socket, endpoint_ids=self.endpoint_ids,
            log_path=self.workdir / "backend.log", detached=self.run_dir is not None,
            msi_window=self._prepared().platform.msi_window, extra_args=self.backend_args)
        self._backend.start()

    def _start_qemu(self) -> None:
        if disks.profile_disks(self.profile) and self._backend is not None:
            self._control.connect()  # the backend serves them before QEMU looks for them
            disks.serve_profile_disks(self, self._sockdir)
        command = self.qemu_command()
        (self.workdir / "qemu-cmdline.txt").write_text(shlex.join(command) + "\n")
        try:
            self._qemu.start(command, self._nic.pass_fds())
        except OSError as exc:
            raise self._launch_failure(f"could not be started: {exc}") from exc

    def _connect(self) -> None:
        """QEMU's console and QMP, then the backend's control socket."""
        try:
            self._qemu.connect()
            if self._backend is not None and not self._control.connected:
                self._control.connect()
        except (MachineError, *QMP_ERRORS) as exc:
            raise self._launch_failure(f"did not come up: {exc}") from exc

    def _wait_for_boot(self) -> None:
        try:
            self._shell.wait_ready(self.boot_timeout)
        except ConsoleClosed as exc:
            raise self._launch_failure(f"closed the console: {exc}") from exc
        except ConsoleError as exc:  # QEMU runs: no need to wait for its exit
            raise self._launch_failure("runs, but the guest's shell did not come up within "
                                       f"{self.boot_timeout:g} s", BootTimeout, 0) from exc

    def _launch_failure(self, what: str, kind: type[VMLaunchError] = VMLaunchError,
                        grace: float = EXIT_GRACE_S) -> MachineError:
        return launch_failure(what, kind, qemu=self._qemu, backend=self._backend,
                              backend_log=self.workdir / "backend.log", grace=grace)

    def reboot(self) -> float:
        """Reboot the guest (a guest-initiated reset, as `reboot -f` does on hardware);
        returns the seconds until its shell is back."""
        seconds = self._shell.reboot(self.boot_timeout)
        self.unplugged_ports.clear()
        return seconds

    # --- QEMU's command line --------------------------------------------------------------------

    def qemu_command(self) -> list[str]:
        """QEMU's command line (viommu.vm.qemu_cmdline); launch() writes the VIOT or the
        device tree it names."""
        return self._command_line().args()

    def _command_line(self) -> QemuCommandLine:
        boot = self._prepared()
        console_log = self.workdir / "console.log" if self.run_dir is not None else None
        dtb = self._dtb if boot.platform.topology == "devicetree" else None
        return QemuCommandLine(self.profile, self.name, self.accel, self._sockets["serial"],
                               self._sockets["qmp"], self.vhost_socket, self._viot, boot, dtb,
                               detached_console_log=console_log, nic=self._nic.nic())

    # --- shutdown -------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 15, hard: bool = False) -> None:
        """Power the guest off (`poweroff -f`, unless `hard` or the backend is dead; else QMP
        quit, SIGTERM, SIGKILL), then close the connections, stop the backend and remove the
        sockets. The backend's trace is saved first: a child backend leaves with QEMU. Safe
        to call again; SIGINT, SIGTERM and SIGHUP wait until it is done."""
        with deferred_signals():
            try:
                self._save_backend_trace()
                hard = hard or self.backend_failure() is not None  # the guest may be stuck
                if self._qemu.running() and (hard or not self._soft_shutdown(timeout / 2)):
                    self._qemu.quit(timeout)
            finally:
                self._close_connections()
                if self._backend is not None:
                    self._backend.stop(timeout=5)
                self._remove_sockets()
                self._nic.close()

    def _save_backend_trace(self) -> None:
        connectable = self._control.connected or self._control.lazy  # not if launch failed
        if self._backend is None or not self._backend.alive() or not connectable:
            return
        try:
            trace = {name: self.backend(name, limit=100000)
                     for name in ("query-requests", "query-events")}
            trace["query-domains"] = self.backend("query-domains")
            (self.workdir / "backend-trace.json").write_text(json.dumps(trace, indent=1) + "\n")
        except (MachineError, *QMP_ERRORS) as exc:
            log.warning("%s: the backend trace was not saved: %s", self.name, exc)

    def _soft_shutdown(self, timeout: float) -> bool:
        """`poweroff -f` in the guest; whether QEMU exited within `timeout`."""
        try:
            self._shell.console().send_line("poweroff -f")
        except (MachineError, ConsoleError, OSError) as exc:
            log.info("%s: no poweroff through the console (%s)", self.name, exc)
            return False
        return self._qemu.exit_status(timeout) is not None

    def _close_connections(self) -> None:
        try:
            self._qemu.close()
        finally:
            self._control.close()

    def _remove_sockets(self) -> None:
        state = [self.run_dir / runs.STATE_FILE] if self.run_dir is not None else []
        for path in [*self._sockets.values(), *state]:
            Path(path).unlink(missing_ok=True)
        try:
            self._sockdir.rmdir()
        except OSError as exc:  # a run directory: it keeps the logs
            log.debug("%s: kept %s: %s", self.name, self._sockdir, exc.strerror)

    # --- guest --------------------------------------------------------------------------------

    def run(self, command: str, timeout: float = 30) -> CommandResult:
        return self._shell.console().run(command, timeout)

    def console_held(self) -> bool:
        """Another client holds this detached VM's serial console (`viommu console`)."""
        return self._shell.held()

    def wait_for_console(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for another client to leave the serial console."""
        return self._shell.wait_until_free(timeout)

    def mark(self) -> int:
        return self._shell.console().mark()

    def wait_line(self, pattern: str, timeout: float = 30, since: int = 0) -> str:
        return self._shell.console().wait_for(pattern, timeout, since).group(0)

    def fault_lines(self, since: int) -> list[str]:
        return self._shell.console().lines_since(since, GUEST_FAULT_LINE)

    def wait_fault_window(self) -> float:
        """Wait until the guest will print its next 10 fault lines (guest.wait_fault_window);
        returns the seconds waited."""
        trace = self.backend("query-events", limit=1)["trace"]
        return wait_fault_window(trace[-1]["time"] if trace else None)

    # --- QMP ------------------------------------------------------------------------------------

    def backend(self, command: str, **args: Any) -> Any:
        """Run a control command on the backend; raises MachineError with its QMP error, and
        BackendGone when the backend is dead."""
        if not self._control.connected:
            failure = self.backend_failure()
            if failure is not None:
                raise BackendGone(failure)
        return self._control.execute(command, args)

    def backend_failure(self) -> str | None:
        """Why the backend cannot serve (it died, and how), with what to do; None while it
        runs (or when this VM has none)."""
        backend = self._backend
        if backend is None or backend.alive():
            return None
        why = backend.why_gone() if hasattr(backend, "why_gone") else "stopped"
        return (f"{self.name}'s backend (pid {backend.pid}) died ({why}): the guest's IOMMU no "
                "longer answers and QEMU cannot take a new backend (README, Reliability); "
                f"`viommu down {self.name}` ends the VM (logs: {self.workdir})")

    def qmp(self, command: str, **args: Any) -> Any:
        return self._qemu.qmp.execute(command, args)

    # --- endpoints on a running VM ----------------------------------------------------------

    def add_endpoint(self, port: int, name: str | None = None, pri: bool = False,
                     timeout: float = 30) -> HotpluggedEndpoint:
        """Hot-plug a DMA endpoint served by the backend (vfio-user) into root port `port`
        (with PCIe PRI when `pri`); returns once the guest has enumerated it, and where the
        kernel attaches endpoints when the IOMMU registers, put it in an IOMMU group (older
        kernels do when a driver binds it: `viommu-vfio bind`)."""
        return hotplug.plug(self, port, name, pri, timeout)

    def add_disk(self, port: int, disk: DiskSpec | None = None, name: str | None = None,
                 timeout: float = 60) -> HotpluggedEndpoint:
        """Hot-plug a virtio-blk disk the backend serves (viommu.vm.disks) into root port
        `port`; returns once the guest's virtio_blk has it (`.disk`: vda...)."""
        return hotplug.plug(self, port, name, False, timeout, disk or DiskSpec())

    def remove_endpoint(self, endpoint: HotpluggedEndpoint, timeout: float = 30) -> None:
        """Hot-unplug: QEMU removes the device once the guest lets go of it."""
        hotplug.unplug(self, endpoint, timeout)

    def inject(self, event_type: str, endpoint: int | None = None, **args: Any) -> dict:
        """Inject an SMMUv3 event for an endpoint (default: the profile's first)."""
        sid = self.endpoint_ids[0] if endpoint is None else endpoint
        return self.backend("inject-event", type=event_type, sid=sid, **args)

