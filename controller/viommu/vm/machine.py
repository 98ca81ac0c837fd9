"""A test VM: the viommu backend, QEMU and the guest console in one object.

In the manner of QEMU's python/qemu/machine: `launch()` starts the backend and QEMU and waits
for the guest shell; `run()` executes guest commands; `wait_line()` waits for console lines;
`backend()` and `qmp()` talk to the backend and to QEMU over QMP; `shutdown()` stops it all
and leaves the logs (qemu.log, console.log, backend.log, backend-trace.json) in `workdir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from viommu import uapi
from viommu.backend.backend import Backend
from viommu.transport.sockets import listen_private_unix
from viommu.vm import paths, runs
from viommu.vm.console import CommandResult, Console, ConsoleError
from viommu.vm.profile import NetworkSpec, Profile, load_profile
from viommu.vm.viot import bdf, build_viot

if TYPE_CHECKING:
    from viommu.vm.network import PrivateNetwork, Tap

log = logging.getLogger(__name__)

READY_LINE = r"viommu-guest: ready"
# The layers an in-process backend logs from (each module logs as its own name).
BACKEND_LOGGERS = ("viommu.backend", "viommu.transport", "viommu.device", "viommu.events",
                   "viommu.dataplane", "viommu.endpoints")
# Linux virtio-iommu's fault line, without the "virtio_iommu virtioN: " prefix.
GUEST_FAULT_LINE = r"virtio_iommu virtio\d+: (?:unknown|domain|page) fault from EP \d+.*$"
# Linux's DEFAULT_RATELIMIT_INTERVAL for those lines, plus a margin for jiffies and delivery
GUEST_FAULT_WINDOW_S = 5.0 + 0.3


class MachineError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A DMA endpoint plugged into a running VM."""

    name: str  # QEMU device id
    endpoint_id: int  # = requester ID
    port: int

    @property
    def sysfs_name(self) -> str:
        rid = self.endpoint_id
        return f"0000:{rid >> 8:02x}:{rid >> 3 & 31:02x}.{rid & 7}"


def detect_accel() -> str:
    """KVM where it works; TCG where there is no usable /dev/kvm, or where it is kvm_pvm
    (on which Linux guests die with a KVM emulation failure)."""
    forced = os.environ.get("VIOMMU_ACCEL")
    if forced:
        return forced
    return "tcg" if kvm_unusable_reason() else "kvm"


def kvm_unusable_reason() -> str | None:
    """Why KVM cannot run our guests here, or None when it can."""
    if os.path.exists("/sys/module/kvm_pvm"):
        return "the host's KVM is kvm_pvm, on which Linux guests die with an emulation failure"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


class Machine:
    def __init__(self, profile: Profile | str = "default", *, workdir: Path | str | None = None,
                 accel: str = "auto", name: str = "vm", boot_timeout: float = 120,
                 backend_in_process: bool = False, iommu: str | None = None,
                 network: PrivateNetwork | None = None,
                 run_dir: Path | str | None = None) -> None:
        """`iommu` overrides the profile's: "viommu" (ours), "qemu" (QEMU's in-process
        virtio-iommu-pci, to compare against) or "none". `network`: the segment the VM's NIC
        joins (the profile's [network], or its defaults); VMs given the same one can talk.
        A profile with [network] and no `network` gets a segment of its own.

        `run_dir` makes a detached VM (`viommu up`): QEMU and the backend run in sessions of
        their own and outlive this process; sockets, logs and state.json live in `run_dir`,
        and `Machine.attach(run_dir)` drives the VM again from another process."""
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self._profile_ref = profile if isinstance(profile, str) else self.profile.name
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._attached = False  # found again by attach(): connections are made on first use
        if iommu is not None:
            self.profile = dataclasses.replace(self.profile, iommu=iommu)
        self.network = network
        self._own_network: PrivateNetwork | None = None
        self._tap: Tap | None = None
        self.accel = detect_accel() if accel == "auto" else accel
        self.name = name
        self.boot_timeout = boot_timeout
        # In-process: the backend's loop runs in a thread of this process (handy under a
        # debugger); default: its own process, so it cannot share our GIL or our crashes.
        self.backend_in_process = backend_in_process
        self.inprocess_backend: Backend | None = None
        self._backend_log_handler: logging.Handler | None = None
        if workdir is None:
            workdir = self.run_dir or tempfile.mkdtemp(prefix=f"viommu-{name}-")
        # Unix socket paths are limited to ~107 bytes: keep them in a short private dir.
        self._sockdir = self.run_dir or Path(tempfile.mkdtemp(prefix="viommu-"))
        self._sockdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._sockdir, 0o700)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.vhost_socket = str(self._sockdir / "vhost-user.sock")
        self.control_socket = str(self._sockdir / "control.sock")
        self._qmp_socket = str(self._sockdir / "qmp.sock")
        self._serial_socket = str(self._sockdir / "serial.sock")
        self._backend_proc: subprocess.Popen | None = None
        self._qemu_proc: subprocess.Popen | None = None
        self._backend_qmp: QEMUMonitorProtocol | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self.console: Console | None = None
        self.boot_seconds: float | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def qemu_pid(self) -> int | None:
        return self._qemu_proc.pid if self._qemu_proc is not None else None

    def backend_exit_status(self, timeout: float) -> int | None:
        """Wait for the backend process to end; its exit status, or None if it did not."""
        if self._backend_proc is None:
            return None
        try:
            return self._backend_proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def backend_pid(self) -> int:
        if self._backend_proc is not None:
            return self._backend_proc.pid
        return os.getpid()  # in-process backend

    @property
    def endpoint_ids(self) -> list[int]:
        return [self.profile.endpoint_id(ep) for ep in self.profile.endpoints]

    def launch(self) -> None:
        started = time.monotonic()
        try:
            if self.profile.iommu == "viommu":
                self._start_backend()
            try:
                self._start_qemu()
            except MachineError:
                self._check_backend_alive()  # the likelier cause, when it died
                raise
            if self._backend_proc is not None:
                self._check_backend_alive()
                self._backend_qmp.connect()
            self._wait_for_shell(since=0)
            self.boot_seconds = time.monotonic() - started
            if self.run_dir is not None:
                self._save_run_state()
        except BaseException:
            self.shutdown()
            raise
        log.info("%s booted in %.1f s (%s)", self.name, self.boot_seconds, self.accel)

    def _wait_for_shell(self, since: int) -> None:
        self.console.wait_for(READY_LINE, timeout=self.boot_timeout, since=since)
        self._take_shell()

    def _take_shell(self, timeout: float = 30) -> None:
        # The controller's session: no echo (busybox then skips line editing), no prompt.
        self.console.send_line("stty -echo; PS1=''")
        self.console.run("true", timeout).check()

    def reboot(self) -> float:
        """Reboot the guest (a guest-initiated reset, as `reboot -f` does on hardware);
        returns the seconds until its shell is back."""
        started = time.monotonic()
        mark = self.mark()
        self._console().send_line("reboot -f")
        self._wait_for_shell(since=mark)
        return time.monotonic() - started

    def _start_backend(self) -> None:
        if self.backend_in_process:
            self._start_backend_thread()
            return
        # We bind both sockets and hand them over, so QEMU starts (and connects) while the
        # backend is still starting: its start-up overlaps QEMU's instead of preceding it.
        listeners = [listen_private_unix(p) for p in (self.vhost_socket, self.control_socket)]
        fds = [sock.fileno() for sock in listeners]
        cmd = [sys.executable, "-m", "viommu.backend", "--socket", self.vhost_socket,
               "--control", self.control_socket, "--socket-fd", str(fds[0]),
               "--control-fd", str(fds[1])]
        for ep in self.endpoint_ids:
            cmd += ["--endpoint", str(ep)]
        try:
            with open(self.workdir / "backend.log", "ab") as out:
                self._backend_proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    pass_fds=fds, start_new_session=self.run_dir is not None)
        finally:
            for sock in listeners:
                sock.close()
        self._backend_qmp = QEMUMonitorProtocol(self.control_socket)

    def _check_backend_alive(self) -> None:
        if self._backend_proc is not None and self._backend_proc.poll() is not None:
            log_path = self.workdir / "backend.log"
            raise MachineError(f"the viommu backend exited with status "
                               f"{self._backend_proc.returncode}; see {log_path}:\n"
                               f"{_tail(log_path)}")

    def _start_backend_thread(self) -> None:
        handler = logging.FileHandler(self.workdir / "backend.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        for name in BACKEND_LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
        self._backend_log_handler = handler
        self.inprocess_backend = Backend(self.vhost_socket, self.control_socket,
                                         self.endpoint_ids)
        self.inprocess_backend.start_in_thread()
        self._backend_qmp = QEMUMonitorProtocol(self.control_socket)
        self._backend_qmp.connect()

    def qemu_command(self) -> list[str]:
        p = self.profile
        kernel, initrd, _ = paths.guest_image()
        mem = f"{p.memory_mib}M"
        cmd = [
            paths.qemu_binary(), "-name", self.name, "-nodefaults", "-no-user-config",
            "-machine", "q35,memory-backend=mem", "-accel", self.accel,
            "-cpu", "host" if self.accel == "kvm" else "max",
            "-smp", str(p.cpus), "-m", mem,
            # vhost-user needs guest RAM it can map: a shared memfd.
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-display", "none",
            "-chardev", self._serial_chardev(),
            "-serial", "chardev:serial",
            "-chardev", self._monitor_chardev(),
            "-mon", "chardev=mon,mode=control",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", p.kernel_cmdline,
        ] + self._iommu_args()
        for port in range(p.root_ports):
            cmd += ["-device", f"pcie-root-port,id=rp{port},chassis={port + 1},slot={port + 1},"
                               f"bus=pcie.0,addr={p.root_port_first_addr + port:#x}"]
        for ep in p.endpoints:
            opts = "".join(f",{k}={v}" for k, v in ep.options.items())
            cmd += ["-device", f"{ep.device},id={ep.name},bus=rp{ep.port}{opts}"]
        return cmd + self._network_args() + list(p.extra_args)

    def _network_args(self) -> list[str]:
        """The NIC, on pcie.0 (outside the VIOT's ranges, so outside the vIOMMU), on a tap of
        the VM's segment that QEMU inherits as an fd (see `_pass_fds`)."""
        if self.network is None and self.profile.network is None:
            return []
        spec = self.profile.network or NetworkSpec()
        if self.network is None:
            from viommu.vm.network import PrivateNetwork  # pyroute2: only when a NIC is wanted

            self.network = self._own_network = PrivateNetwork(spec.name)
        if self._tap is None:
            self._tap = self.network.add_tap()
        return ["-netdev", f"tap,id={spec.name},fd={self._tap.fd}",
                "-device", f"{spec.model},netdev={spec.name},bus=pcie.0,addr={spec.addr:#x},"
                           f"mac={spec.mac(self._tap.index)}"]

    def _pass_fds(self) -> tuple[int, ...]:
        return (self._tap.fd,) if self._tap is not None else ()

    def _iommu_args(self) -> list[str]:
        p = self.profile
        if p.iommu == "none":
            return []
        if p.iommu == "qemu":
            return ["-device", f"virtio-iommu-pci,bus=pcie.0,addr={p.iommu_addr:#x}"]
        viot = self.workdir / "viot.bin"
        viot.write_bytes(build_viot(p.iommu_bdf, p.viot_ranges()))
        return ["-chardev", f"socket,id=viommu,path={self.vhost_socket}",
                "-device", "vhost-user-test-device-pci,chardev=viommu,"
                           f"virtio-id={uapi.VIRTIO_ID_IOMMU},num_vqs={uapi.NUM_QUEUES},"
                           f"config_size={uapi.CONFIG_SIZE},bus=pcie.0,addr={p.iommu_addr:#x}",
                "-acpitable", f"file={viot}"]

    def _serial_chardev(self) -> str:
        spec = f"socket,id=serial,path={self._serial_socket},server=on,wait=on"
        if self.run_dir is None:
            return spec
        # Detached: QEMU logs the console itself, so it is kept while nobody is attached.
        return f"{spec},logfile={self.workdir / 'console.log'},logappend=on"

    def _monitor_chardev(self) -> str:
        # QEMU connects to our QMP server; a detached QEMU listens, for whoever attaches.
        spec = f"socket,id=mon,path={self._qmp_socket}"
        return f"{spec},server=on,wait=off" if self.run_dir is not None else spec

    def _start_qemu(self) -> None:
        cmd = self.qemu_command()
        (self.workdir / "qemu-cmdline.txt").write_text(shlex.join(cmd) + "\n")
        detached = self.run_dir is not None
        self._qmp = QEMUMonitorProtocol(self._qmp_socket, server=not detached)
        with open(self.workdir / "qemu.log", "ab") as out:
            self._qemu_proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL,
                                               pass_fds=self._pass_fds(),
                                               start_new_session=detached)
        # QEMU waits for the serial client (wait=on) before it connects to our QMP socket,
        # so no console output is lost.
        _wait_for_path(self._serial_socket, 30, self._qemu_proc, "QEMU",
                       self.workdir / "qemu.log")
        self.console = self._open_console()
        if detached:
            _wait_for_path(self._qmp_socket, 30, self._qemu_proc, "QEMU",
                           self.workdir / "qemu.log")
            self._qmp.connect()
        else:
            self._qmp.accept(timeout=30)

    def _open_console(self) -> Console:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._serial_socket)
        # A detached QEMU writes console.log itself (logfile=): do not write it twice.
        log_path = self.workdir / "console.log" if self.run_dir is None else Path(os.devnull)
        return Console(sock, log_path)

    def shutdown(self, timeout: float = 15) -> None:
        """Power the guest off (QMP quit if it will not), then collect the backend's trace."""
        self._save_backend_trace()
        if self._qemu_proc is not None and self._qemu_proc.poll() is None:
            try:
                self._console().send_line("poweroff -f")
                self._qemu_proc.wait(timeout / 2)
            except Exception:  # noqa: BLE001 - fall back to QMP quit below
                pass
        if self._qemu_proc is not None and self._qemu_proc.poll() is None:
            try:
                if self._qmp_client() is not None:
                    self._qmp_client().cmd_raw("quit")
            except Exception:  # noqa: BLE001 - QEMU may already be going away
                pass
            _wait_or_kill(self._qemu_proc, timeout)
        for client in (self._qmp, self._backend_qmp):
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001
                    pass
        self._qmp = self._backend_qmp = None
        if self.console is not None:
            self.console.close()
            self.console = None
        if self._backend_proc is not None:
            _wait_or_kill(self._backend_proc, 5)
        if self.inprocess_backend is not None:
            self.inprocess_backend.stop()
            self.inprocess_backend.join(5)
            self.inprocess_backend = None
        if self._backend_log_handler is not None:
            for name in BACKEND_LOGGERS:
                logging.getLogger(name).removeHandler(self._backend_log_handler)
            self._backend_log_handler.close()
            self._backend_log_handler = None
        state = [str(self.run_dir / runs.STATE_FILE)] if self.run_dir is not None else []
        for path in [self.vhost_socket, self.control_socket, self._qmp_socket,
                     self._serial_socket, *state]:
            if os.path.exists(path):
                os.unlink(path)
        try:
            os.rmdir(self._sockdir)
        except OSError:
            pass
        if self._own_network is not None:  # QEMU is gone: nothing holds the segment now
            self._own_network.close()
            self.network = self._own_network = self._tap = None

    def _save_backend_trace(self) -> None:
        if self._backend_qmp is None:
            return
        if self._backend_proc is not None and self._backend_proc.poll() is not None:
            return
        try:
            trace = {name: self.backend(name, limit=100000)
                     for name in ("query-requests", "query-events")}
            trace["query-domains"] = self.backend("query-domains")
            (self.workdir / "backend-trace.json").write_text(json.dumps(trace, indent=1) + "\n")
        except Exception as exc:  # noqa: BLE001 - best effort while shutting down
            log.warning("could not save the backend trace: %s", exc)

    # --- guest --------------------------------------------------------------------------------

    def run(self, command: str, timeout: float = 30) -> CommandResult:
        return self._console().run(command, timeout)

    def mark(self) -> int:
        return self._console().mark()

    def wait_line(self, pattern: str, timeout: float = 30, since: int = 0) -> str:
        return self._console().wait_for(pattern, timeout, since).group(0)

    def fault_lines(self, since: int) -> list[str]:
        return self._console().lines_since(since, GUEST_FAULT_LINE)

    def wait_fault_window(self) -> float:
        """Wait until the guest will print its next 10 fault lines: Linux rate-limits them
        (dev_err_ratelimited: 10 per 5 s window, opened by the first line after the last
        window ran out), so 5 s after the last event the backend sent, a fresh window opens.
        Returns the seconds waited (0 when that is already past)."""
        trace = self.backend("query-events", limit=1)["trace"]
        wait = trace[-1]["time"] + GUEST_FAULT_WINDOW_S - time.time() if trace else 0.0
        if wait > 0:
            time.sleep(wait)
        return max(wait, 0.0)

    def _console(self) -> Console:
        if self.console is None and self._attached:
            self.console = self._open_console()
            try:
                self._take_shell(timeout=10)
            except ConsoleError as exc:
                raise MachineError(f"{self.name}'s guest shell did not answer within 10 s: "
                                   "the serial console takes one client at a time; leave "
                                   "`viommu console` (Ctrl-]) and try again") from exc
        if self.console is None:
            raise MachineError(f"{self.name} is not running")
        return self.console

    # --- QMP ------------------------------------------------------------------------------------

    def backend(self, command: str, **args: Any) -> Any:
        """Run a control command on the backend; raises MachineError with its QMP error."""
        return _execute(self._backend_qmp, "backend", command, args)

    def qmp(self, command: str, **args: Any) -> Any:
        return _execute(self._qmp_client(), "QEMU", command, args)

    def _qmp_client(self) -> QEMUMonitorProtocol | None:
        if self._qmp is None and self._attached:
            self._qmp = QEMUMonitorProtocol(self._qmp_socket)
            self._qmp.connect()
        return self._qmp

    # --- detached VMs (viommu up) ---------------------------------------------------------------

    def _save_run_state(self) -> None:
        runs.RunState(
            name=self.name, profile=self._profile_ref, accel=self.accel,
            qemu_pid=self._qemu_proc.pid,
            backend_pid=self._backend_proc.pid if self._backend_proc else None,
            started=time.time(), workdir=str(self.workdir),
            sockets={"qmp": self._qmp_socket, "serial": self._serial_socket,
                     "control": self.control_socket, "vhost-user": self.vhost_socket},
        ).save(self.run_dir)

    @classmethod
    def attach(cls, run_dir: Path | str) -> Machine:
        """The detached VM in `run_dir`, driven from this process. The backend's control
        socket is connected now; the console and QEMU's QMP on first use (each takes one
        client at a time). `release()` lets go of it, `shutdown()` ends it."""
        state = runs.RunState.load(Path(run_dir))
        vm = cls(state.profile, workdir=state.workdir, accel=state.accel, name=state.name,
                 run_dir=run_dir)
        vm._attached = True
        vm._qemu_proc = runs.PidProcess(state.qemu_pid, vm._qmp_socket)
        if vm._qemu_proc.poll() is not None:
            raise MachineError(f"{state.name}'s QEMU (pid {state.qemu_pid}) is gone; see "
                               f"{state.workdir}/qemu.log")
        if state.backend_pid is not None:
            vm._backend_proc = runs.PidProcess(state.backend_pid, vm.control_socket)
            vm._backend_qmp = QEMUMonitorProtocol(vm.control_socket)
            vm._backend_qmp.connect()
        return vm

    def release(self) -> None:
        """Let go of a detached VM and leave it running: the guest's shell gets its echo and
        prompt back (for `viommu console`), and this process's connections close."""
        if self.console is not None:
            # run(), not send_line(): QEMU drops what it has not read when a client leaves.
            self.console.run("stty echo; . /etc/profile")
            self.console.close()
            self.console = None
        for client in (self._qmp, self._backend_qmp):
            if client is not None:
                client.close()
        self._qmp = self._backend_qmp = None
        self._attached = True  # what is used next connects again

    # --- endpoints on a running VM ----------------------------------------------------------

    def add_endpoint(self, port: int, name: str | None = None, pri: bool = False,
                     timeout: float = 30) -> Endpoint:
        """Hot-plug a DMA endpoint served by the backend (vfio-user) into root port `port`
        (with PCIe PRI when `pri`); returns once the guest has it in an IOMMU group."""
        endpoint_id = bdf(self.profile.port_bus(port), 0)
        name = name or f"dma{port}"
        sock = self.backend("endpoint-create", endpoint=endpoint_id, pri=pri)["socket"]
        self.qmp("device_add", driver="vfio-user-pci", id=name, bus=f"rp{port}",
                 socket={"type": "unix", "path": sock})
        endpoint = Endpoint(name, endpoint_id, port)
        _poll(f"the guest to put {endpoint.sysfs_name} in an IOMMU group", timeout,
              lambda: self.run(f"test -e /sys/bus/pci/devices/{endpoint.sysfs_name}/iommu_group"
                               ).status == 0)
        return endpoint

    def remove_endpoint(self, endpoint: Endpoint, timeout: float = 30) -> None:
        """Hot-unplug: QEMU removes the device once the guest lets go of it."""
        self.qmp("device_del", id=endpoint.name)
        _poll(f"the guest to drop {endpoint.sysfs_name}", timeout,
              lambda: self.run(f"test -e /sys/bus/pci/devices/{endpoint.sysfs_name}"
                               ).status != 0)
        _poll(f"QEMU to delete {endpoint.name}", timeout,
              lambda: endpoint.name not in {d.get("qdev_id") for b in self.qmp("query-pci")
                                            for p in b["devices"]
                                            for d in p.get("pci_bridge", {}).get("devices", [])})
        self.backend("endpoint-delete", endpoint=endpoint.endpoint_id)

    def inject(self, event_type: str, endpoint: int | None = None, **args: Any) -> dict:
        """Inject an SMMUv3 event for an endpoint (default: the profile's first)."""
        sid = self.endpoint_ids[0] if endpoint is None else endpoint
        return self.backend("inject-event", type=event_type, sid=sid, **args)


def _execute(client: QEMUMonitorProtocol | None, who: str, command: str,
             args: dict[str, Any]) -> Any:
    if client is None:
        raise MachineError(f"no QMP connection to {who}")
    response = client.cmd_raw(command, {k.replace("_", "-"): v for k, v in args.items()})
    if "error" in response:
        raise MachineError(f"{who} {command}: {response['error']['desc']}")
    return response["return"]


def _poll(what: str, timeout: float, probe: Callable[[], object]) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise MachineError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def _wait_for_path(path: str, timeout: float, proc: subprocess.Popen, what: str,
                   log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise MachineError(f"{what} exited with status {proc.returncode}; see {log_path}:\n"
                               f"{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise MachineError(f"{what} did not create {path} within {timeout:g} s")
        time.sleep(0.02)


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
