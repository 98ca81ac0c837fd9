"""Named VMs that outlive the command that booted them (`viommu up`).

Each one has a private run directory, `<run root>/<name>/`, holding its sockets, its logs and
`state.json` (pids, profile, socket paths, hot-plugged endpoints). `Machine.attach(run_dir)`
drives it again from another process; `viommu ls` lists the run root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from viommu.vm.processes import process_alive

STATE_FILE = "state.json"
# Short and shell-safe: it becomes a path component of unix sockets (~107 bytes at most).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class RunError(RuntimeError):
    """A named VM is missing, stale or clashes with another; the message says what to do."""


def run_root() -> Path:
    """VIOMMU_RUN_DIR, else $XDG_RUNTIME_DIR/viommu, else viommu-<uid> in the temp dir."""
    override = os.environ.get("VIOMMU_RUN_DIR")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if override:
        root = Path(override)
    elif runtime and os.path.isdir(runtime):
        root = Path(runtime) / "viommu"
    else:
        root = Path(tempfile.gettempdir()) / f"viommu-{os.getuid()}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The temp dir is shared: a root someone else made could hand them our sockets.
    if root.stat().st_uid != os.getuid():
        raise RunError(f"{root} belongs to another user; set VIOMMU_RUN_DIR to a directory "
                       "of your own")
    return root


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise RunError(f"VM name {name!r}: use 1-32 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    return name


def run_dir(name: str) -> Path:
    return run_root() / check_name(name)


@dataclasses.dataclass
class RunState:
    """What state.json says about a detached VM."""

    name: str
    profile: str  # a name in qemu-configs/ or a path, as given to Machine
    accel: str
    qemu_pid: int
    backend_pid: int | None
    started: float  # time.time() when it had booted
    workdir: str  # logs: qemu.log, console.log, backend.log
    sockets: dict[str, str] = dataclasses.field(default_factory=dict)
    endpoints: list[dict] = dataclasses.field(default_factory=list)  # hot-plugged DMA endpoints
    arch: str = "x86_64"
    kernel: str | None = None  # the kernel SPEC as given (None: the default)
    kernel_release: str = ""  # what booted: `uname -r` ...
    kernel_origin: str = ""  # ... and where it came from, with its exact version
    qemu: str = ""  # the QEMU binary and its version

    def save(self, directory: Path) -> None:
        tmp = directory / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        tmp.replace(directory / STATE_FILE)  # readers never see half a file

    @classmethod
    def load(cls, directory: Path) -> RunState:
        data = json.loads((directory / STATE_FILE).read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @property
    def alive(self) -> bool:
        return process_alive(self.qemu_pid, self.sockets.get("qmp", ""))

    @property
    def uptime(self) -> float:
        return time.time() - self.started


def list_runs() -> list[tuple[Path, RunState]]:
    """Every run directory with a state.json, by name; stale ones included (`.alive`)."""
    found = []
    for directory in sorted(run_root().iterdir()):
        if (directory / STATE_FILE).is_file():
            try:
                found.append((directory, RunState.load(directory)))
            except (ValueError, TypeError, OSError):
                continue  # half-written by a crashed `up`: not a VM we can drive
    return found


def find_run(name: str) -> tuple[Path, RunState]:
    """The running VM called `name`; RunError naming the known ones otherwise."""
    directory = run_dir(name)
    if (directory / STATE_FILE).is_file():
        state = RunState.load(directory)
        if state.alive:
            return directory, state
        raise RunError(f"VM {name!r} is stale: its QEMU (pid {state.qemu_pid}) is gone; see "
                       f"{state.workdir}/qemu.log, then `viommu down {name}` to clean up")
    running = [s.name for _, s in list_runs() if s.alive]
    known = (f"running: {', '.join(running)}" if running
             else "none is running; start one with `viommu up default`")
    raise RunError(f"no VM named {name!r} ({known})")


def remove_run(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
