"""The command line end to end, each step its own process as a user would run it:
`viommu up` -> `ls` -> `inject` -> `state` -> `down`, on one VM boot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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

    [listed] = json.loads(ok(viommu(run_root, "ls", "--json")))
    assert (listed["name"], listed["profile"], listed["alive"]) == (NAME, "default", True)
    assert re.search(rf"^{NAME}\s+default\s+(tcg|kvm)\s+{listed['qemu_pid']}\s.*running$",
                     ok(viommu(run_root, "ls")), re.M)

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
