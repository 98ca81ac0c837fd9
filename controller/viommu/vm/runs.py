"""Named VMs that outlive the command that booted them (`viommu up`).

Each one has a private run directory, `<run root>/<name>/`, holding its sockets, its logs and
`state.json` (pids, profile, socket paths, hot-plugged endpoints). `Machine.attach(run_dir)`
drives it again from another process; `viommu ls` lists the run root.

state.json is written before any process starts (status "starting", with the pid of the
`viommu up` that boots it) and again as each one starts, so a VM is never running unseen:
`viommu ls` shows it whatever became of its `up`, and `viommu down` ends it. Every process of
a VM names its run directory on its command line (its sockets are there), so `down` finds
them even without state.json (`processes_of`).
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

import psutil

from viommu.vm import backend_watch
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
    qemu_pid: int | None  # None until QEMU is started
    backend_pid: int | None
    started: float  # time.time() when it had booted (or when `up` began, while starting)
    workdir: str  # logs: qemu.log, console.log, backend.log
    sockets: dict[str, str] = dataclasses.field(default_factory=dict)
    endpoints: list[dict] = dataclasses.field(default_factory=list)  # hot-plugged DMA endpoints
    arch: str = "x86_64"
    kernel: str | None = None  # the kernel SPEC as given (None: the default)
    kernel_release: str = ""  # what booted: `uname -r` ...
    kernel_origin: str = ""  # ... and where it came from, with its exact version
    qemu: str = ""  # the QEMU binary and its version
    status: str = "running"  # "starting" until the guest's shell is up
    up_pid: int | None = None  # the `viommu up` booting it, while starting

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
        """Its QEMU runs: the VM exists."""
        return self.qemu_pid is not None and process_alive(self.qemu_pid,
                                                           self.sockets.get("qmp", ""))

    @property
    def backend_alive(self) -> bool:
        return self.backend_pid is not None and process_alive(self.backend_pid,
                                                              self.sockets.get("control", ""))

    @property
    def starting(self) -> bool:
        """Its `viommu up` is still booting it."""
        return (self.status == "starting" and self.up_pid is not None
                and process_alive(self.up_pid, "viommu"))

    def backend_exit(self, wait: float = 0.0) -> dict | None:
        """How the backend ended, as its watcher recorded it (viommu.vm.backend_watch).
        `wait`: for a backend just seen dead, the time its watcher gets to write that (it
        reaps and writes a moment after /proc has dropped the pid)."""
        return backend_watch.read_record(os.path.join(self.workdir, backend_watch.EXIT_RECORD),
                                         wait)

    def health(self) -> str:
        """One phrase for `viommu ls`: starting, running, backend dead (how), or stale."""
        if self.starting:
            return f"starting (viommu up, pid {self.up_pid})"
        if not self.alive:
            return "stale (QEMU gone)" if self.status == "running" else \
                "failed to start (nothing runs)"
        if self.status == "starting":
            return "orphaned: its `viommu up` died before the guest was up"
        if self.backend_pid is not None and not self.backend_alive:
            record = self.backend_exit(wait=backend_watch.RECORD_WAIT)
            how = (f"{record['how']} at "
                   f"{time.strftime('%H:%M:%S', time.localtime(record['time']))}"
                   if record else "gone, how unrecorded")
            return f"backend dead ({how})"
        return "running"

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
        if state.starting:
            raise RunError(f"VM {name!r} is still starting (viommu up, pid {state.up_pid}); "
                           "try again once it is up")
        if state.alive and state.status == "starting":
            raise RunError(f"VM {name!r} was never ready: its `viommu up` died while it "
                           f"booted; `viommu down {name}` ends it")
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


# What the processes of a VM run: QEMU, the backend, the backend's watcher.
_VM_PROGRAMS = ("qemu-system-", "viommu.backend", "viommu.vm.backend_watch")


def processes_of(directory: Path) -> list[psutil.Process]:
    """The processes of the VM in `directory` (QEMU, the backend, its watcher), found by
    their command lines, which name the directory (their sockets, the watcher's record):
    whatever state.json says, or when there is none. A process that merely reads a file
    there (`tail -f console.log`) is not one of them."""
    token = str(directory) + os.sep
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or ()
            if proc.info["status"] != psutil.STATUS_ZOMBIE \
                    and any(token in arg for arg in cmdline) \
                    and any(program in arg for arg in cmdline[:4] for program in _VM_PROGRAMS):
                found.append(proc)
        except psutil.Error:
            continue
    return found
