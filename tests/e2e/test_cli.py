"""The command line end to end, each step its own process as a user would run it:
`viommu up` -> `ls` -> `inject` -> `state` -> `down`, on one VM boot; and on a bad day: a
killed backend, a held console, signals while `up` boots."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from viommu.vm import runs
from viommu.vm.guest_kernel import GuestKernel

NAME = "cli"


@pytest.fixture
def run_root() -> Iterator[Path]:
    # A root of its own (not the user's VMs); short, as unix socket paths must be.
    root = Path(tempfile.mkdtemp(prefix="viommu-cli-"))
    yield root
    if (root / NAME / runs.STATE_FILE).exists():
        viommu(root, "down", NAME)  # a failed test must not leave its VM running
    shutil.rmtree(root, ignore_errors=True)


def viommu(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIOMMU_RUN_DIR": str(root)}
    return subprocess.run([sys.executable, "-m", "viommu", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_up_ls_inject_state_down(run_root: Path) -> None:
    up = ok(viommu(run_root, "up", "default", "--name", NAME, timeout=180))
    assert f"viommu console {NAME}" in up and f"viommu down {NAME}" in up
    qemu = re.search(r"^QEMU (\S*qemu-system-\w+ \(QEMU \d+\.\d+\))$", up, re.M)
    assert qemu, up  # the binary that runs, and its version

    [listed] = json.loads(ok(viommu(run_root, "ls", "--json")))
    assert (listed["name"], listed["profile"], listed["alive"]) == (NAME, "default", True)
    assert re.search(rf"^{NAME}\s+default\s+(tcg|kvm)\s+{listed['qemu_pid']}\s.*running$",
                     ok(viommu(run_root, "ls")), re.M)
    assert f"{qemu[1]}: {NAME}" in ok(viommu(run_root, "ls"))

    injected = ok(viommu(run_root, "inject", NAME, "C_BAD_STE", "--sid", "0x100",
                         "--wait", "20"))
    assert "delivered 1" in injected
    console_log = (run_root / NAME / "console.log").read_text(errors="replace")
    assert re.search(r"virtio_iommu virtio\d+: unknown fault from EP 256$", console_log, re.M)

    state = ok(viommu(run_root, "state", NAME))
    # The endpoint has no driver: attached on kernels that attach endpoints when the IOMMU
    # registers (7.x), not on those that wait for a driver (6.12): viommu.vm.guest_kernel.
    kernel = GuestKernel(listed["kernel_release"], listed["arch"])
    row = (r"\d+\s+translated\s+yes" if kernel.attaches_at_registration
           else r"-\s+blocked\s+no")
    assert re.search(rf"^0x100\s+01:00\.0\s+{row}\s+C_BAD_STE$", state, re.M), state
    assert re.search(r"^events\s+injected=1 delivered=1 ", state, re.M)

    ok(viommu(run_root, "down", NAME))
    assert not (run_root / NAME).exists()
    assert not runs.process_alive(listed["qemu_pid"], listed["sockets"]["qmp"])
    assert "no VMs" in ok(viommu(run_root, "ls"))


# --- a bad day (issue 14): a dead backend, a held console, signals during `up` --------------


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """A failed command's stderr: one line, no traceback."""
    assert result.returncode == 1, f"{result.args}:\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_killed_backend_is_shown_dead_every_command_says_so_and_down_ends_the_vm(
        run_root: Path) -> None:
    ok(viommu(run_root, "up", "default", "--name", NAME, timeout=180))
    state = runs.RunState.load(run_root / NAME)
    os.kill(state.backend_pid, signal.SIGKILL)
    killed = time.monotonic()
    listing = ok(viommu(run_root, "ls"))
    # `ls` itself takes a while to start (Python, imports); what it shows is within a second
    assert re.search(rf"^{NAME}\s.*backend dead \(killed by SIGKILL at [\d:]+\)$", listing,
                     re.M), listing
    assert f"`viommu down {NAME}`" in listing
    print(f"ls showed the backend dead {time.monotonic() - killed:.2f} s after the kill")
    for command in (["state"], ["inject", "C_BAD_STE"], ["trace", "--duration", "1"]):
        line = one_line_error(viommu(run_root, command[0], NAME, *command[1:]))
        assert "died (killed by SIGKILL at " in line and f"`viommu down {NAME}`" in line, line
    down = ok(viommu(run_root, "down", NAME))
    assert down.strip().splitlines()[-1].startswith(f"{NAME} is down"), down
    assert not runs.process_alive(state.qemu_pid, state.sockets["qmp"])
    assert not (run_root / NAME).exists()


@contextlib.contextmanager
def held_console(run_root: Path) -> Iterator[socket.socket]:
    """A client on the serial console, as `viommu console` is (it takes one at a time)."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(run_root / NAME / "serial.sock"))
    try:
        yield client
    finally:
        client.close()


def test_attach_detach_and_down_work_while_viommu_console_holds_the_console(
        run_root: Path) -> None:
    ok(viommu(run_root, "up", "default", "--name", NAME, timeout=180))
    qemu = runs.RunState.load(run_root / NAME)
    with held_console(run_root):
        # plugged and recorded without the console; the guest's enumeration is not checked
        attached = ok(viommu(run_root, "attach", NAME, "--port", "1", timeout=90))
        assert "dma1: endpoint 0x200" in attached and "console is held" in attached, attached
        # --vfio needs the console: it waits for the client to leave
        waiting = subprocess.Popen(
            [sys.executable, "-m", "viommu", "attach", NAME, "--port", "2", "--vfio"],
            env={**os.environ, "VIOMMU_RUN_DIR": str(run_root)}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        time.sleep(4)
        assert waiting.poll() is None, waiting.communicate()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "waiting up to" in err and "dma2: endpoint 0x300" in out and "bound to vfio-pci" in out
    recorded = [e["name"] for e in runs.RunState.load(run_root / NAME).endpoints]
    assert recorded == ["dma1", "dma2"]
    with held_console(run_root):
        for name in ("dma1", "dma2"):
            assert f"{name} (endpoint" in ok(viommu(run_root, "detach", NAME, name, timeout=90))
        assert runs.RunState.load(run_root / NAME).endpoints == []
        ok(viommu(run_root, "down", NAME, timeout=90))
    assert not runs.process_alive(qemu.qemu_pid, qemu.sockets["qmp"])
    assert not (run_root / NAME).exists()


def test_sighup_then_ctrl_c_during_up_stop_what_it_started_with_one_line(
        run_root: Path) -> None:
    env = {**os.environ, "VIOMMU_RUN_DIR": str(run_root)}
    up = subprocess.Popen([sys.executable, "-m", "viommu", "up", "default", "--name", NAME],
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    directory, deadline = run_root / NAME, time.monotonic() + 120
    state = None
    while state is None or state.qemu_pid is None:  # state.json comes before any process
        assert up.poll() is None and time.monotonic() < deadline, up.communicate()
        if (directory / runs.STATE_FILE).exists():
            state = runs.RunState.load(directory)
            assert state.status == "starting" and state.up_pid == up.pid
        time.sleep(0.05)
    listing = ok(viommu(run_root, "ls"))
    assert re.search(rf"^{NAME}\s.*starting \(viommu up, pid {up.pid}\)$", listing, re.M)
    up.send_signal(signal.SIGHUP)  # the terminal closed...
    time.sleep(0.1)
    up.send_signal(signal.SIGINT)  # ... and Ctrl-C, twice, while it cleans up
    up.send_signal(signal.SIGINT)
    _, err = up.communicate(timeout=60)
    assert up.returncode == 130, err
    assert "Traceback" not in err
    # the Ctrl-C held during clean-up may be the last word
    assert re.fullmatch(r"viommu up: interrupted \((SIGHUP|Ctrl-C)\); the VM it was booting was "
                        r"stopped \(its logs stay in the run directory\)",
                        err.strip().splitlines()[-1]), err
    assert not runs.process_alive(state.qemu_pid, state.sockets["qmp"])
    assert state.backend_pid is None or not runs.process_alive(state.backend_pid,
                                                               state.sockets["control"])
    assert runs.processes_of(directory) == []
    assert "no VMs" in ok(viommu(run_root, "ls"))


def test_attach_blk_records_the_disk_with_the_guests_name_for_it_and_detach_removes_it(
        run_root: Path) -> None:
    ok(viommu(run_root, "up", "default", "--name", NAME, timeout=180))
    attached = ok(viommu(run_root, "attach", NAME, "--port", "2", "--blk", timeout=90))
    [disk] = runs.RunState.load(run_root / NAME).endpoints
    assert disk["name"] == "disk2" and disk["disk"], disk  # vda...: seen by the guest
    assert f"the guest's /dev/{disk['disk']}, image {disk['image']}" in attached, attached
    assert "disk2 (endpoint 0x300) removed" in ok(viommu(run_root, "detach", NAME, "disk2",
                                                         timeout=90))
    assert runs.RunState.load(run_root / NAME).endpoints == []
    ok(viommu(run_root, "down", NAME))
