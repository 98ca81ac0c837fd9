"""`viommu up`, `ls` and `down`: VMs that keep running between commands, in run
directories (viommu.vm.runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from viommu.cli import readiness, views
from viommu.cli.common import CliError, note, say
from viommu.cli.terminal import DETACH_KEY_NAME, progress
from viommu.vm import runs
from viommu.vm.accel import detect_accel, kvm_unusable_reason
from viommu.vm.machine import Machine


def cmd_up(args: argparse.Namespace) -> int:
    name = runs.check_name(args.name or Path(args.profile).stem)
    directory = runs.run_dir(name)
    _clear_stale(directory, name)
    readiness.prepare(args)
    accel = _choose_accel(args.accel)
    profile = readiness.profile_argument(args.profile)
    machine = Machine(profile, accel=accel, name=name, run_dir=directory,
                      boot_timeout=args.timeout)
    with progress(f"booting {name} ({accel.upper()})"):
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
        f"{n} is up: profile {state.profile}, {state.accel.upper()}, QEMU pid {state.qemu_pid}, "
        f"backend pid {state.backend_pid}",
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
                     views.duration(state.uptime), status))
    if not rows:
        say(f"no VMs in {runs.run_root()}; start one with `viommu up default`")
        return 0
    say(views.table(("name", "profile", "accel", "qemu", "backend", "uptime", "status"),
                    rows))
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

