"""`viommu up`, `ls` and `down`: VMs that keep running between commands, in run
directories (viommu.vm.runs).

`down` always ends the VM, whatever state it is in: QMP quit (after `poweroff -f` when the
guest can still take it), then SIGTERM and SIGKILL by pid; then any process left that names
the run directory (viommu.vm.runs.processes_of, so even without state.json); then the run
directory goes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

from viommu.cli import readiness, views
from viommu.cli.common import CliError, note, say
from viommu.cli.terminal import DETACH_KEY_NAME, progress
from viommu.vm import runs
from viommu.vm.accel import detect_accel, kvm_unusable_reason
from viommu.vm.machine import Machine
from viommu.vm.paths import SetupMissing
from viommu.vm.processes import end_all
from viommu.vm.profile import load_profile

log = logging.getLogger(__name__)


def cmd_up(args: argparse.Namespace) -> int:
    name = runs.check_name(args.name or Path(args.profile).stem)
    directory = runs.run_dir(name)
    _clear_stale(directory, name)
    _preflight()
    profile = readiness.profile_argument(args.profile)
    load_profile(profile)  # a bad one is its problems, before anything else is said or done
    readiness.setup_if_asked(args, profile)
    accel = _choose_accel(args.accel)
    machine = Machine(profile, accel=accel, name=name, run_dir=directory,
                      boot_timeout=args.timeout, kernel=args.kernel, modules=args.modules,
                      arch=args.arch)
    machine.prepare()  # fetches or builds what is missing, with its own progress lines
    args.interrupted = "; the VM it was booting was stopped (its logs stay in the run directory)"
    with progress(f"booting {name} ({machine.arch}, {accel.upper()}, kernel "
                  f"{machine.boot.image.kernel.release})"):
        machine.launch()
    args.interrupted = f"; {name} is up (`viommu down {name}` ends it)"
    machine.release()
    say(_up_usage(runs.RunState.load(directory), directory))
    return 0


def _clear_stale(directory: Path, name: str) -> None:
    if not (directory / runs.STATE_FILE).exists():
        return
    state = runs.RunState.load(directory)
    if state.alive or state.starting or runs.processes_of(directory):
        raise CliError(f"a VM named {name!r} exists ({state.health()}); use it, end it with "
                       f"`viommu down {name}`, or pick another --name")
    note(f"removing the stale run directory of {name!r} (its QEMU is gone)")
    runs.remove_run(directory)


def _preflight() -> None:
    """What `up` needs of the host before it starts anything (QEMU, the kernel and its
    initramfs are the Machine's to provide), with what to do when it is missing."""
    try:
        os.close(os.memfd_create("viommu-check"))
    except OSError as exc:
        raise SetupMissing(f"no shared memory: memfd_create failed ({exc.strerror}); the "
                           "backend maps guest RAM from a shared memfd: allow memfd_create "
                           "(in a container, in its seccomp profile)") from None


def _choose_accel(requested: str) -> str:
    if requested == "auto" and os.environ.get("VIOMMU_ACCEL"):
        return detect_accel()
    if requested == "tcg":
        return "tcg"
    reason = kvm_unusable_reason()
    if reason is None:
        return "kvm"
    note(f"KVM is not usable ({reason}); using TCG instead: slower, but the guest and the "
         "vIOMMU behave the same")
    return "tcg"


def _up_usage(state: runs.RunState, directory: Path) -> str:
    n = state.name
    commands = [
        (f"viommu console {n}", f"serial console; detach with {DETACH_KEY_NAME}"),
        (f"viommu inject {n} C_BAD_STE --sid 0x100", "inject an SMMUv3 event"),
        (f"viommu trace {n}", "follow requests, faults, page requests, translations"),
        (f"viommu state {n}", "endpoints, domains, mappings, counters"),
        (f"viommu attach {n} --port 1", "hot-plug a DMA endpoint"),
        (f"viommu shell {n}", "Python with `vm` bound"),
        (f"viommu down {n}", "power off and clean up"),
    ]
    width = max(len(c) for c, _ in commands)
    return "\n".join([
        f"{n} is up: profile {state.profile}, {state.arch}, {state.accel.upper()}, QEMU pid "
        f"{state.qemu_pid}, backend pid {state.backend_pid}",
        f"kernel {state.kernel_release} ({state.kernel_origin})",
        f"QEMU {state.qemu}",
        f"run directory: {directory} (sockets, state.json, logs)",
        f"console log:   {state.workdir}/console.log (kept while nobody is attached)", "",
        *(f"  {c.ljust(width)}   {what}" for c, what in commands)])


def _ls_entry(directory: Path, state: runs.RunState) -> dict:
    health = state.health()  # first: a backend just seen dead gets the time for its record
    return {**dataclasses.asdict(state), "alive": state.alive, "run_dir": str(directory),
            "backend_alive": state.backend_alive, "backend_exit": state.backend_exit(),
            "health": health}


def cmd_ls(args: argparse.Namespace) -> int:
    found = runs.list_runs()
    if args.json:
        say(json.dumps([_ls_entry(d, s) for d, s in found], indent=1))
        return 0
    rows, hints = [], []
    for directory, state in found:
        status = state.health()
        stale = not state.alive and not state.starting
        if stale and args.prune and not runs.processes_of(directory):
            runs.remove_run(directory)
            status = "stale: removed"
        elif status != "running" and not state.starting:
            hints.append(f"`viommu down {state.name}` ends {state.name}"
                         + ("" if stale else f" (logs: {state.workdir})"))
        rows.append((state.name, state.profile, state.accel, state.qemu_pid, state.backend_pid,
                     views.duration(state.uptime), state.arch, state.kernel_release or None,
                     status))
    if not rows:
        say(f"no VMs in {runs.run_root()}; start one with `viommu up default`")
        return 0
    say(views.table(("name", "profile", "accel", "qemu", "backend", "uptime", "arch", "kernel",
                     "status"), rows))
    qemus: dict[str, list[str]] = {}
    for _, state in found:
        qemus.setdefault(state.qemu or "QEMU unknown (started by an older viommu)",
                         []).append(state.name)
    for qemu, names in qemus.items():  # the binary and its version, once for the VMs it runs
        say(f"{qemu}: {', '.join(names)}")
    for hint in hints:
        say(hint)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    directory = runs.run_dir(args.name)
    if not directory.is_dir():
        runs.find_run(args.name)  # says there is no such VM, and which there are
    state = _state_of(directory)
    stale = state is not None and not state.alive and not state.starting
    with progress(f"shutting {args.name} down"):
        problem = _shut_down(directory, state)
        killed = end_all(runs.processes_of(directory))  # whatever is left of it, by pid
    if args.keep_logs:
        for name in ("vhost-user.sock", "control.sock", "qmp.sock", "serial.sock",
                     runs.STATE_FILE):
            (directory / name).unlink(missing_ok=True)
    else:
        runs.remove_run(directory)
    what = (f"was stale (its QEMU had exited); removed {directory}" if stale and not killed
            else "is down")
    left = (f"; ended what was left of it by pid ({', '.join(map(str, killed))})" if killed
            else "")
    extra = f" ({problem or 'its processes outlived the shutdown'}{left})" if problem or killed \
        else ""
    kept = f"; logs kept in {directory}" if args.keep_logs else ""
    say(f"{args.name} {what}{extra}{kept}")
    return 0


def _state_of(directory: Path) -> runs.RunState | None:
    try:
        return runs.RunState.load(directory)
    except (OSError, ValueError, TypeError):  # none, or half-written by a killed `up`
        return None


def _shut_down(directory: Path, state: runs.RunState | None) -> str | None:
    """Power it off through its Machine while QEMU runs; what went wrong, or None."""
    if state is None or not state.alive:
        return None if state is not None else "no readable state.json"
    try:
        Machine.attach(directory).shutdown()
    except Exception as exc:  # noqa: BLE001 - whatever it was, the processes go by pid
        log.info("shutting %s down through QMP failed: %r", directory.name, exc)
        return f"it did not shut down cleanly: {exc}"
    return None

