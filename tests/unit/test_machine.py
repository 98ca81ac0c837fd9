"""Machine without a booted guest: its helpers, and launches that fail."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from viommu.vm import machine as machine_module
from viommu.vm import runs
from viommu.vm.errors import BackendLaunchError, BootTimeout, VMLaunchError
from viommu.vm.guest import GUEST_FAULT_WINDOW_S
from viommu.vm.machine import Machine
from viommu.vm.profile import load_profile


@pytest.mark.parametrize(("last_event_age", "expected_wait"), [
    (None, 0.0), (2.0, GUEST_FAULT_WINDOW_S - 2.0), (GUEST_FAULT_WINDOW_S + 1, 0.0)])
def test_fault_window_waits_until_five_seconds_after_the_last_event(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, last_event_age: float | None,
        expected_wait: float) -> None:
    vm = Machine("default", workdir=tmp_path, accel="tcg")
    now = time.time()
    trace = [] if last_event_age is None else [{"seq": 1, "time": now - last_event_age}]
    monkeypatch.setattr(vm, "backend", lambda command, **args: {"trace": trace})
    monkeypatch.setattr(machine_module.time, "time", lambda: now)
    slept: list[float] = []
    monkeypatch.setattr(machine_module.time, "sleep", slept.append)
    assert vm.wait_fault_window() == pytest.approx(expected_wait)
    assert sum(slept) == pytest.approx(expected_wait)


# --- launches that fail: typed errors that say why ------------------------------------------
# These start the real QEMU from set-up, but no guest gets as far as its shell.


def no_leftovers(vm: Machine) -> None:
    """QEMU and the backend are gone, and so are the sockets and their directory."""
    sockdir = Path(vm.control_socket).parent
    assert vm.qemu_pid is not None and not runs.process_alive(vm.qemu_pid, str(sockdir))
    assert vm.backend_exit_status(0) is not None
    assert not sockdir.exists()


def test_a_kernel_qemu_cannot_open_is_a_launch_error_with_its_exit_status_and_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-kernel"
    vm = Machine("default", workdir=tmp_path / "vm", accel="tcg", boot_timeout=5)
    boot = vm.guest_kernel and vm.boot  # prepared: QEMU, the kernel and its initramfs
    kernel = dataclasses.replace(boot.image.kernel, image=missing)
    vm.boot = dataclasses.replace(boot, image=dataclasses.replace(boot.image, kernel=kernel))
    with pytest.raises(VMLaunchError) as failure:
        vm.launch()
    error = failure.value
    assert type(error) is VMLaunchError  # QEMU's failure, not the backend's that followed it
    assert error.exit_code == 1 and "exited with status 1" in str(error)
    assert "could not open kernel file" in error.log_tail
    assert f"could not open kernel file '{missing}'" in str(error)
    assert error.command[error.command.index("-kernel") + 1] == str(missing)
    assert shlex.join(error.command) in str(error)
    assert "console, last lines:" in str(error)
    no_leftovers(vm)


def test_a_backend_that_exits_at_once_is_a_backend_launch_error_with_its_log(
        tmp_path: Path) -> None:
    no_endpoints = dataclasses.replace(load_profile("default"), endpoints=())
    vm = Machine(no_endpoints, workdir=tmp_path, accel="tcg", boot_timeout=5)
    with pytest.raises(BackendLaunchError) as failure:
        vm.launch()
    error = failure.value
    assert error.exit_status == 2 and "exited with status 2" in str(error)
    assert "give at least one --endpoint" in error.log_tail
    assert error.log_tail in str(error) and str(tmp_path / "backend.log") in str(error)
    no_leftovers(vm)


def test_a_guest_too_slow_for_the_boot_timeout_is_a_boot_timeout(tmp_path: Path) -> None:
    vm = Machine("default", workdir=tmp_path, accel="tcg", boot_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BootTimeout) as failure:
        vm.launch()
    error = failure.value
    assert error.exit_code is None and "did not come up within 0.5 s" in str(error)
    assert error.command[0].endswith("qemu-system-x86_64")
    assert time.monotonic() - started < 60
    no_leftovers(vm)


def test_a_socket_qemu_has_bound_but_not_yet_listens_on_is_tried_again(tmp_path: Path) -> None:
    """QEMU binds a socket (its file appears) just before it listens: a connection in
    between is refused, and connecting again once it listens succeeds."""
    import socket
    import threading

    from viommu.vm.qemu_process import QemuProcess

    path = str(tmp_path / "serial.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)  # bound, not listening: connecting is refused
    qemu = QemuProcess(name="vm", serial_socket=path, qmp_socket=str(tmp_path / "qmp.sock"),
                       log_path=tmp_path / "qemu.log", console_log=tmp_path / "console.log",
                       detached=True)
    qemu.proc = subprocess.Popen(["sleep", "30"])
    attempts = []

    def connect() -> None:
        attempts.append(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)

    timer = threading.Timer(0.2, server.listen)
    timer.start()
    try:
        qemu._once_listening(connect)
    finally:
        timer.join()
        qemu.proc.kill()
        qemu.proc.wait()
        server.close()
    assert len(attempts) > 1


# --- the console when QEMU goes (issue 14) ---------------------------------------------------


def test_a_console_qemu_reset_is_console_closed_and_closing_it_never_raises(
        tmp_path: Path) -> None:
    """QEMU exiting with our input unread resets the connection (ECONNRESET, not EOF): a
    booting guest's launch then reports QEMU's failure, and shutdown closes quietly."""
    import socket

    from viommu.vm.console import Console, ConsoleClosed

    ours, qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    console = Console(ours, tmp_path / "console.log")
    qemu.sendall(b"[    1.0] booting\n")
    console.send_line("poweroff -f")  # QEMU never reads it
    qemu.close()
    with pytest.raises(ConsoleClosed):
        console.wait_for("viommu-guest: ready", timeout=2)
    with pytest.raises(ConsoleClosed):
        console.send_line("true")
    console.close()
    assert "booting" in (tmp_path / "console.log").read_text()


# --- backend arguments: benchmarks run the backend in other modes ---------------------------

def test_backend_args_reach_the_backend_process_and_only_a_process(tmp_path: Path) -> None:
    from viommu.vm.backend_supervisor import supervisor
    common = {"vhost_socket": "vu.sock", "control_socket": "ctl.sock", "endpoint_ids": [256],
              "log_path": tmp_path / "backend.log", "detached": False,
              "msi_window": (0xFEE0_0000, 0xFEEF_FFFF)}
    child = supervisor(in_process=False, extra_args=["--null-device"], **common)
    assert child.command(3, 4)[-1] == "--null-device"
    with pytest.raises(ValueError, match="need a backend process"):
        supervisor(in_process=True, extra_args=["--null-device"], **common)


def test_backend_command_line_modes_become_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from viommu.backend import backend as backend_module
    from viommu.backend import cli
    built = []
    monkeypatch.setattr(backend_module.Backend, "__init__",
                        lambda self, *args: built.append(args[4]))
    monkeypatch.setattr(backend_module.Backend, "run", lambda self: None)
    assert cli.main(["--socket", "vu.sock", "--endpoint", "256", "--null-device",
                     "--fixed-poll", "--poll-us", "50", "--no-event-thread"]) == 0
    [options] = built
    assert (options.null_device, options.adaptive_poll, options.poll_us) == (True, False, 50)
    assert options.event_thread is False and options.request_thread is True
    assert cli.main(["--socket", "vu.sock", "--endpoint", "256", "--null-device",
                     "--no-request-thread"]) == 2
