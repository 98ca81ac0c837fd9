"""`viommu up`, `ls` and `down`: VMs that keep running between commands, in run
directories (viommu.vm.runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from viommu.cli import views
from viommu.cli.common import CliError, note, say
from viommu.cli.terminal import DETACH_KEY_NAME, progress
from viommu.vm import runs
from viommu.vm.accel import detect_accel, kvm_unusable_reason
from viommu.vm.machine import Machine
from viommu.vm.paths import SetupMissing


def cmd_up(args: argparse.Namespace) -> int:
    name = runs.check_name(args.name or Path(args.profile).stem)
    directory = runs.run_dir(name)
    _clear_stale(directory, name)
    _preflight()
    accel = _choose_accel(args.accel)
    machine = Machine(args.profile, accel=accel, name=name, run_dir=directory,
                      boot_timeout=args.timeout, kernel=args.kernel, modules=args.modules,
                      arch=args.arch)
    machine.prepare()  # fetches or builds what is missing, with its own progress lines
    with progress(f"booting {name} ({machine.arch}, {accel.upper()}, kernel "
                  f"{machine.boot.image.kernel.release})"):
        machine.launch()
    machine.release()
    say(_up_usage(runs.RunState.load(directory), directory))
    return 0


def _clear_stale(directory: Path, name: str) -> None:
    if not (directory / runs.STATE_FILE).exists():
        return
    state = runs.RunState.load(directory)
    if state.alive:
        raise CliError(f"a VM named {name!r} is already running (QEMU pid {state.qemu_pid}); "
                       f"use it, stop it with `viommu down {name}`, or pick another --name")
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


def cmd_ls(args: argparse.Namespace) -> int:
    found = runs.list_runs()
    if args.json:
        say(json.dumps([{**dataclasses.asdict(s), "alive": s.alive, "run_dir": str(d)}
                        for d, s in found], indent=1))
        return 0
    rows = []
    for directory, state in found:
        status = "running" if state.alive else "stale (QEMU gone)"
        if not state.alive and args.prune:
            runs.remove_run(directory)
            status = "stale: removed"
        rows.append((state.name, state.profile, state.accel, state.qemu_pid, state.backend_pid,
                     views.duration(state.uptime), state.arch, state.kernel_release or None,
                     status))
    if not rows:
        say(f"no VMs in {runs.run_root()}; start one with `viommu up default`")
        return 0
    say(views.table(("name", "profile", "accel", "qemu", "backend", "uptime", "arch", "kernel",
                     "status"), rows))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    directory = runs.run_dir(args.name)
    if (directory / runs.STATE_FILE).exists() and not runs.RunState.load(directory).alive:
        runs.remove_run(directory)
        say(f"{args.name} was stale (its QEMU had exited); removed {directory}")
        return 0
    runs.find_run(args.name)
    vm = Machine.attach(directory)
    with progress(f"shutting {args.name} down"):
        vm.shutdown()
    if args.keep_logs:
        say(f"{args.name} is down; logs kept in {vm.workdir}")
    else:
        runs.remove_run(directory)
        say(f"{args.name} is down")
    return 0

