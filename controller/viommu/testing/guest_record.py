"""What a test did to its guest, kept for its report: the console output and the backend's
trace entries since it started, what QEMU and the backend logged meanwhile, and every event
it injected. A failed test's report gets them as sections; with --viommu-results every test
that used a guest gets a directory of them, with a reproduce.sh."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viommu.testing.reproduce import Injection, VmChoice, script

if TYPE_CHECKING:
    from viommu.cli.tracing import TraceFollower
    from viommu.testing.outcomes import Outcome
    from viommu.vm.machine import Machine

CONSOLE_EXCERPT = 6000  # characters of console output in a report section
LOG_TAIL_LINES = 40
MAX_LOG_BYTES = 1 << 20  # of each log, in a results directory
LOGS = ("qemu.log", "backend.log")


def artifact_name(nodeid: str) -> str:
    """A test's directory in the results: its node id, made a safe file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_")[:150] or "test"


@dataclasses.dataclass
class GuestRecord:
    machine: Machine
    vm: VmChoice
    console_mark: int
    trace: TraceFollower | None
    log_offsets: dict[str, int]
    injected: list[Injection] = dataclasses.field(default_factory=list)
    entries: list[dict] = dataclasses.field(default_factory=list)
    trace_error: str = ""
    snapshot: dict[str, str] | None = None  # taken when the test lets go of its guest

    @classmethod
    def start(cls, machine: Machine, vm: VmChoice) -> GuestRecord:
        from viommu.cli.tracing import TraceFollower

        trace = TraceFollower(machine.backend) if machine.profile.iommu == "viommu" else None
        offsets = {name: _size(machine.workdir / name) for name in LOGS}
        return cls(machine, vm, machine.mark(), trace, offsets)

    @contextlib.contextmanager
    def recording_injections(self) -> Iterator[None]:
        """Record every inject-event sent to the backend meanwhile, whoever sends it
        (the `inject` fixture, Machine.inject, a test's own backend() call)."""
        machine = self.machine
        backend = machine.backend

        def recording(command: str, **args: Any) -> Any:
            reply = backend(command, **args)
            if command == "inject-event":
                fields = {k: v for k, v in args.items() if k not in ("type", "sid")}
                self.injected.append(Injection(str(args.get("type")), args.get("sid"), fields))
            return reply

        machine.backend = recording  # type: ignore[method-assign]
        try:
            yield
        finally:
            del machine.backend  # the class's method again

    # --- what happened since the test started ---------------------------------------------

    def trace_entries(self) -> list[dict]:
        """The backend's trace entries since the test started (polled, then kept)."""
        if self.trace is not None and not self.trace_error:
            try:
                self.entries += self.trace.poll()
            except Exception as exc:  # noqa: BLE001 - the backend may be what failed
                self.trace_error = f"(backend did not answer: {exc})"
        return self.entries

    def trace_text(self) -> str:
        from viommu.cli.tracing import format_entry

        if self.trace is None:
            return "(no viommu backend: the profile's iommu is not viommu)"
        lines = [format_entry(entry) for entry in self.trace_entries()]
        return "\n".join(lines + [self.trace_error]).strip() or "(no entries)"

    def console_text(self) -> str:
        console = self.machine.console
        return console.transcript[self.console_mark:] if console is not None else ""

    def log_text(self, name: str) -> str:
        """What the VM's log `name` got since the test started."""
        try:
            with open(self.machine.workdir / name, "rb") as log:
                log.seek(self.log_offsets.get(name, 0))
                return log.read(MAX_LOG_BYTES).decode(errors="replace")
        except OSError:
            return ""

    def take_snapshot(self) -> None:
        """Keep it all while the guest is still there (the session's last test outlives it)."""
        self.snapshot = {"console.log": self.console_text(), "backend-trace.txt":
                         self.trace_text(), **{name: self.log_text(name) for name in LOGS}}

    # --- reports ----------------------------------------------------------------------------

    def failure_sections(self) -> list[tuple[str, str]]:
        sections = []
        if self.machine.console is not None:
            sections.append(("guest console during this test",
                             self.console_text()[-CONSOLE_EXCERPT:] or "(nothing printed)"))
        if self.injected:
            sections.append(("events injected", "\n".join(map(str, self.injected))))
        if self.trace is not None:
            sections.append(("backend trace during this test", self.trace_text()))
        sections.append(("qemu log (tail)", _tail(self.machine.workdir / "qemu.log")))
        sections.append(("logs", str(self.machine.workdir)))
        return sections

    def write_artifacts(self, directory: Path, outcome: Outcome) -> None:
        """console.log, backend-trace.txt, qemu.log and backend.log of this test, test.json
        and reproduce.sh, in `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        texts = self.snapshot or {}
        for name in ("console.log", "backend-trace.txt", *LOGS):
            text = texts.get(name, "")
            (directory / name).write_text(text or f"(nothing during {outcome.nodeid})\n")
        reproducer = directory / "reproduce.sh"
        reproducer.write_text(script(outcome.nodeid, self.vm, self.injected))
        reproducer.chmod(0o755)
        (directory / "test.json").write_text(json.dumps({
            **dataclasses.asdict(outcome), "vm": dataclasses.asdict(self.vm),
            "accel": self.machine.accel, "workdir": str(self.machine.workdir),
            "injected": [dataclasses.asdict(i) for i in self.injected]}, indent=1) + "\n")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return "(no log)"
    return "\n".join(lines) or "(empty)"
