"""The `viommu` command line.

VMs that keep running between commands: `up` boots one, then `ls`, `console`, `inject`,
`trace`, `state`, `attach`, `detach`, `shell` use it by name, and `down` ends it. `demo` is
the one-shot tour; `backend` is the process a VM's virtio-iommu runs in.
"""

from __future__ import annotations

import argparse
import code
import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from viommu import __version__
from viommu.backend import cli as backend_cli
from viommu.backend.cli import int_arg
from viommu.cli import views
from viommu.cli.terminal import DETACH_KEY_NAME, interact, progress
from viommu.cli.tracing import TraceFollower, format_entry
from viommu.events.smmuv3 import ADDRESS_EVENTS, FETCH_EVENTS, EventId
from viommu.vm import paths, runs
from viommu.vm.accel import detect_accel, kvm_unusable_reason
from viommu.vm.console import ConsoleError
from viommu.vm.errors import MachineError
from viommu.vm.hotplug import HotpluggedEndpoint
from viommu.vm.machine import Machine
from viommu.vm.paths import SetupMissing

EVENT_NAMES = [e.name for e in EventId]


class CliError(RuntimeError):
    """A mistake on the command line; the message says what to do instead."""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _note(text: str) -> None:
    print(f"viommu: note: {text}", file=sys.stderr, flush=True)


# --- one-shot commands ------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from viommu.cli.demo import run_demo

    return run_demo(profile=args.profile, accel=args.accel, keep_logs=args.logs)


# --- up / ls / down ---------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    name = runs.check_name(args.name or Path(args.profile).stem)
    directory = runs.run_dir(name)
    _clear_stale(directory, name)
    _preflight()
    accel = _choose_accel(args.accel)
    machine = Machine(args.profile, accel=accel, name=name, run_dir=directory,
                      boot_timeout=args.timeout)
    with progress(f"booting {name} ({accel.upper()})"):
        machine.launch()
    machine.release()
    _say(_up_usage(runs.RunState.load(directory), directory))
    return 0


def _clear_stale(directory: Path, name: str) -> None:
    if not (directory / runs.STATE_FILE).exists():
        return
    state = runs.RunState.load(directory)
    if state.alive:
        raise CliError(f"a VM named {name!r} is already running (QEMU pid {state.qemu_pid}); "
                       f"use it, stop it with `viommu down {name}`, or pick another --name")
    _note(f"removing the stale run directory of {name!r} (its QEMU is gone)")
    runs.remove_run(directory)


def _preflight() -> None:
    """What `up` needs before it starts anything, each with what to do when it is missing."""
    binary = paths.qemu_binary()
    version = paths.qemu_version(binary)
    if version is None or version < paths.MIN_QEMU_VERSION:
        found = "does not run" if version is None else f"is {version[0]}.{version[1]}"
        need = ".".join(map(str, paths.MIN_QEMU_VERSION))
        raise SetupMissing(f"QEMU {binary} {found}; viommu needs >= {need}: run ./scripts/setup "
                           "(it installs a private QEMU into .cache) or set VIOMMU_QEMU")
    paths.guest_image()
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
    _note(f"KVM is not usable ({reason}); using TCG instead: slower, but the guest and the "
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
        _say(json.dumps([{**dataclasses.asdict(s), "alive": s.alive, "run_dir": str(d)}
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
        _say(f"no VMs in {runs.run_root()}; start one with `viommu up default`")
        return 0
    _say(views.table(("name", "profile", "accel", "qemu", "backend", "uptime", "status"),
                     rows))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    directory = runs.run_dir(args.name)
    if (directory / runs.STATE_FILE).exists() and not runs.RunState.load(directory).alive:
        runs.remove_run(directory)
        _say(f"{args.name} was stale (its QEMU had exited); removed {directory}")
        return 0
    runs.find_run(args.name)
    vm = Machine.attach(directory)
    with progress(f"shutting {args.name} down"):
        vm.shutdown()
    if args.keep_logs:
        _say(f"{args.name} is down; logs kept in {vm.workdir}")
    else:
        runs.remove_run(directory)
        _say(f"{args.name} is down")
    return 0


# --- using a running VM -----------------------------------------------------------------------


@contextlib.contextmanager
def _attached(name: str) -> Iterator[tuple[Machine, runs.RunState, Path]]:
    """The running VM `name`, driven from this process and released (left running) after."""
    directory, state = runs.find_run(name)
    vm = Machine.attach(directory)
    try:
        yield vm, state, directory
    finally:
        vm.release()


def cmd_console(args: argparse.Namespace) -> int:
    directory, state = runs.find_run(args.name)
    log_path = Path(state.workdir) / "console.log"
    if args.history:
        sys.stdout.write("".join(_tail_lines(log_path, args.history)))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(state.sockets["serial"])
    print(f"[connected to {args.name}'s serial console; detach with {DETACH_KEY_NAME}; "
          "press Enter for a prompt]", file=sys.stderr, flush=True)
    try:
        interact(sock)
    finally:
        sock.close()
    print(f"\r\n[detached; {args.name} keeps running]", file=sys.stderr)
    return 0


def _tail_lines(path: Path, count: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines(keepends=True)[-count:]
    except OSError:
        return []


def cmd_inject(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in (("ssid", args.ssid), ("address", args.addr),
                                ("access", args.access), ("ipa", args.ipa),
                                ("fetch_addr", args.fetch_addr), ("count", args.count),
                                ("class", args.event_class))
              if v is not None}
    fields.update({flag: True for flag in ("privileged", "s2", "stall") if getattr(args, flag)})
    with _attached(args.name) as (vm, state, _):
        log_path = Path(state.workdir) / "console.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        reply = vm.inject(args.event, args.sid, **fields)
    if args.json:
        _say(json.dumps(reply))
    else:
        _say(f"{args.event}: delivered {reply['delivered']}, pending {reply['pending']}, lost "
             f"{reply['lost']}, not forwarded {reply['not_forwarded']} (seq {reply['seq']})")
        if reply["guest_line"]:
            _say(f"guest should print: {reply['guest_line']}")
        if reply["note"]:
            _say(f"note: {reply['note']}")
    if args.wait and reply["guest_line"]:
        return _wait_for_guest_line(log_path, offset, reply["guest_line"], args.wait)
    return 0


def _wait_for_guest_line(log_path: Path, offset: int, text: str, timeout: float) -> int:
    pattern = re.compile(rf"^.*virtio_iommu virtio\d+: {re.escape(text)}$", re.M)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as log_file:
            log_file.seek(offset)
            match = pattern.search(log_file.read())
        if match:
            _say(f"guest printed: {match.group(0).strip()}")
            return 0
        time.sleep(0.1)
    _say(f"the guest printed no such line within {timeout:g} s (Linux prints at most 10 fault "
         f"lines per 5 s); see {log_path}")
    return 1


def cmd_trace(args: argparse.Namespace) -> int:
    print(f"[following {args.name}: requests, faults, page requests, translations; Ctrl-C "
          "stops]", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.duration if args.duration else None
    shown = 0
    with _attached(args.name) as (vm, _, _):
        follower = TraceFollower(vm.backend, from_start=args.all)
        try:
            while deadline is None or time.monotonic() < deadline:
                for entry in follower.poll():
                    _say(json.dumps(entry) if args.json else format_entry(entry))
                    shown += 1
                    if args.count and shown >= args.count:
                        return 0
                time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    with _attached(args.name) as (vm, state, _):
        if args.json:
            _say(json.dumps({name: vm.backend(f"query-{name}") for name in (
                "endpoints", "domains", "requests", "events", "translations",
                "page-requests")} | {"hot_plugged": state.endpoints}, indent=1))
            return 0
        _say(views.state_report(vm.backend))
    if state.endpoints:
        _say("\nhot-plugged (viommu attach)\n" + views.table(
            ("device", "endpoint", "port"),
            [(e["name"], f"{e['endpoint_id']:#x}", e["port"]) for e in state.endpoints]))
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    with _attached(args.name) as (vm, state, directory):
        _check_port_free(vm, state, args.port)
        with progress(f"hot-plugging a DMA endpoint into port {args.port}"):
            endpoint = vm.add_endpoint(args.port, args.id, pri=args.pri)
            if args.vfio:
                vm.run(f"viommu-vfio bind {endpoint.sysfs_name}").check()
    state.endpoints.append(dataclasses.asdict(endpoint))
    state.save(directory)
    _say(f"{endpoint.name}: endpoint {endpoint.endpoint_id:#x} at {endpoint.sysfs_name}"
         f"{' (PRI)' if args.pri else ''}{', bound to vfio-pci' if args.vfio else ''}; "
         f"`viommu detach {args.name} {endpoint.name}` removes it")
    return 0


def _check_port_free(vm: Machine, state: runs.RunState, port: int) -> None:
    taken = {ep.port: ep.name for ep in vm.profile.endpoints}
    taken |= {e["port"]: e["name"] for e in state.endpoints}
    free = [p for p in range(vm.profile.root_ports) if p not in taken]
    if port in taken or port not in range(vm.profile.root_ports):
        why = f"is taken by {taken[port]}" if port in taken else "does not exist"
        raise CliError(f"root port {port} {why}; free ports: "
                       f"{', '.join(map(str, free)) or 'none (detach one first)'}")


def cmd_detach(args: argparse.Namespace) -> int:
    with _attached(args.name) as (vm, state, directory):
        spec = _find_endpoint(state, args.endpoint)
        endpoint = HotpluggedEndpoint(**spec)
        bound = f"/sys/bus/pci/drivers/vfio-pci/{endpoint.sysfs_name}"
        with progress(f"unplugging {endpoint.name}"):
            vm.run(f"test -e {bound} && echo {endpoint.sysfs_name} > "
                   "/sys/bus/pci/drivers/vfio-pci/unbind")
            vm.remove_endpoint(endpoint)
    state.endpoints.remove(spec)
    state.save(directory)
    _say(f"{endpoint.name} (endpoint {endpoint.endpoint_id:#x}) removed")
    return 0


def _find_endpoint(state: runs.RunState, wanted: str) -> dict:
    for spec in state.endpoints:
        if wanted == spec["name"] or _maybe_int(wanted) == spec["endpoint_id"]:
            return spec
    known = ", ".join(f"{e['name']} ({e['endpoint_id']:#x})" for e in state.endpoints)
    raise CliError(f"{state.name} has no hot-plugged endpoint {wanted!r}; "
                   f"{'known: ' + known if known else 'attach one with `viommu attach`'}")


def _maybe_int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


def cmd_shell(args: argparse.Namespace) -> int:
    with _attached(args.name) as (vm, _, _):
        follower = TraceFollower(vm.backend)
        helpers: dict[str, Any] = {
            "vm": vm, "run": vm.run, "inject": vm.inject, "backend": vm.backend, "qmp": vm.qmp,
            "EventId": EventId, "state": lambda: print(views.state_report(vm.backend)),
            "trace": lambda: print("\n".join(map(format_entry, follower.poll()))
                                   or "(nothing new)"),
        }
        code.interact(banner=_shell_banner(args.name), local=helpers,
                      exitmsg=f"[{args.name} keeps running]")
    return 0


def _shell_banner(name: str) -> str:
    return textwrap.dedent(f"""\
        viommu shell on {name}. Bound: vm (the Machine), run("cmd") in the guest,
        inject("C_BAD_STE", sid, ...), backend("query-events"), qmp("query-status"),
        state(), trace() (what happened since the last call), EventId. Ctrl-D leaves;
        the VM keeps running.""")


# --- the parser -------------------------------------------------------------------------------


def _add(sub: Any, name: str, func: Any, help_text: str, examples: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text,
                            epilog="examples:\n" + textwrap.indent(examples.strip(), "  "),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def _add_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the VM's name (see `viommu ls`)")


def _session_commands(sub: Any) -> None:
    up = _add(sub, "up", cmd_up, "boot a VM and leave it running in the background", """
viommu up default              # qemu-configs/default.toml, named "default"
viommu up default --name a     # a second one beside it
viommu up default --accel tcg""")
    up.add_argument("profile", metavar="PROFILE",
                    help="machine profile: a name in qemu-configs/ or a .toml path")
    up.add_argument("--name", help="name to use it by (default: the profile's)")
    up.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    up.add_argument("--timeout", type=float, default=120, metavar="S",
                    help="seconds to wait for the guest's shell")

    ls = _add(sub, "ls", cmd_ls, "list VMs: name, profile, accel, pids, uptime, status", """
viommu ls
viommu ls --prune     # also remove stale entries (their QEMU is gone)
viommu ls --json""")
    ls.add_argument("--prune", action="store_true", help="remove stale entries")
    ls.add_argument("--json", action="store_true")

    down = _add(sub, "down", cmd_down, "power a VM off (poweroff, then QMP quit, then kill) "
                "and remove its run directory", """
viommu down default
viommu down default --keep-logs    # keep console.log, qemu.log, backend.log""")
    _add_name(down)
    down.add_argument("--keep-logs", action="store_true",
                      help="keep the logs in the run directory; only sockets go")


def _use_commands(sub: Any) -> None:
    console = _add(sub, "console", cmd_console, f"attach to a VM's serial console (detach: "
                   f"{DETACH_KEY_NAME})", f"""
viommu console default                 # {DETACH_KEY_NAME} leaves, the VM keeps running
viommu console default --history 0     # no scrollback from console.log first
echo 'dmesg | tail' | viommu console default   # piped: sends, shows output, leaves""")
    _add_name(console)
    console.add_argument("--history", type=int, default=20, metavar="N",
                         help="show the last N lines of console.log first (default 20)")

    _inject_command(sub)

    trace = _add(sub, "trace", cmd_trace, "follow a VM's requests, faults, page requests and "
                 "endpoint DMA translations live", """
viommu trace default                      # until Ctrl-C
viommu trace default --json | jq .kind    # one JSON object a line
viommu trace default --all --duration 2   # what the traces hold, then 2 s more""")
    _add_name(trace)
    trace.add_argument("--json", action="store_true", help="JSON lines, each with a `kind`")
    trace.add_argument("--all", action="store_true",
                       help="start with what the backend's traces still hold")
    trace.add_argument("--count", type=int, metavar="N", help="stop after N entries")
    trace.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    trace.add_argument("--interval", type=float, default=0.2, metavar="S",
                       help="poll interval (default 0.2 s)")

    state = _add(sub, "state", cmd_state, "show endpoints, domains, mappings and counters", """
viommu state default
viommu state default --json""")
    _add_name(state)
    state.add_argument("--json", action="store_true")


def _inject_command(sub: Any) -> None:
    def names(events: object) -> str:
        return textwrap.fill(", ".join(e.name for e in EventId if e in events), 88,
                             initial_indent="  ", subsequent_indent="  ")

    everything, with_address, with_fetch = names(EventId), names(ADDRESS_EVENTS), \
        names(FETCH_EVENTS)
    inject = _add(sub, "inject", cmd_inject, "inject an SMMUv3 event; prints the backend's "
                  "answer", f"""
viommu inject default C_BAD_STE --sid 0x100
viommu inject default C_BAD_CD --sid 0x100 --ssid 1 --wait 10
viommu inject default F_TRANSLATION --sid 0x100 --addr 0x10000 --access write
viommu inject default F_PERMISSION --addr 0x7000 --count 40 --json

events:
{everything}
with an address (--addr, --access, --privileged, --s2, --ipa, --class, --stall):
{with_address}
with a fetch address (--fetch-addr):
{with_fetch}""")
    _add_name(inject)
    inject.add_argument("event", metavar="EVENT", type=str.upper, choices=EVENT_NAMES,
                        help="SMMUv3 event name (list below)")
    inject.add_argument("--sid", type=int_arg, help="StreamID = endpoint ID (default: the "
                        "profile's first endpoint)")
    inject.add_argument("--ssid", type=int_arg, help="SubstreamID (PASID)")
    inject.add_argument("--addr", type=int_arg, help="InputAddr of the faulting access")
    inject.add_argument("--access", choices=("read", "write", "exec"))
    inject.add_argument("--privileged", action="store_true")
    inject.add_argument("--s2", action="store_true", help="a stage-2 fault")
    inject.add_argument("--ipa", type=int_arg, help="IPA of a stage-2 fault")
    inject.add_argument("--fetch-addr", type=int_arg, help="FetchAddr of a fetch fault")
    inject.add_argument("--class", dest="event_class", choices=("CD", "TT", "IN"))
    inject.add_argument("--stall", action="store_true")
    inject.add_argument("--count", type=int, help="a burst of this many")
    inject.add_argument("--json", action="store_true", help="print the answer as JSON")
    inject.add_argument("--wait", type=float, metavar="S",
                        help="wait up to S seconds for the guest's fault line in console.log")


def _endpoint_commands(sub: Any) -> None:
    attach = _add(sub, "attach", cmd_attach, "hot-plug a DMA endpoint (served over vfio-user) "
                  "into a root port", """
viommu attach default --port 1
viommu attach default --port 3 --pri --id dma-pri --vfio""")
    _add_name(attach)
    attach.add_argument("--port", type=int, required=True, help="root port number (rpN)")
    attach.add_argument("--pri", action="store_true", help="with PCIe PRI (page requests)")
    attach.add_argument("--id", help="QEMU device id (default dmaPORT)")
    attach.add_argument("--vfio", action="store_true",
                        help="bind it to vfio-pci in the guest (for viommu-vfio dma)")

    detach = _add(sub, "detach", cmd_detach, "unplug a DMA endpoint `attach` plugged", """
viommu detach default dma1
viommu detach default 0x200""")
    _add_name(detach)
    detach.add_argument("endpoint", metavar="ENDPOINT", help="device id or endpoint ID")

    shell = _add(sub, "shell", cmd_shell, "a Python prompt with `vm` (the running Machine) "
                 "and helpers bound", """
viommu shell default
>>> inject("C_BAD_STE"); trace()
>>> run("ls /sys/kernel/iommu_groups").output""")
    _add_name(shell)


def _one_shot_commands(sub: Any) -> None:
    demo = _add(sub, "demo", cmd_demo, "boot a guest behind the vIOMMU, inject C_BAD_STE, "
                "C_BAD_CD and F_TRANSLATION, show what the guest printed", """
viommu demo
viommu demo --accel tcg --logs /tmp/demo-logs""")
    demo.add_argument("--profile", default="default", help="machine profile in qemu-configs/")
    demo.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    demo.add_argument("--logs", metavar="DIR", help="keep QEMU, console and backend logs here")

    backend = _add(sub, "backend", backend_cli.run, backend_cli.HELP, backend_cli.EXAMPLES)
    backend_cli.add_arguments(backend)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viommu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"viommu {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug); errors show their traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _session_commands(sub)
    _use_commands(sub)
    _endpoint_commands(sub)
    _one_shot_commands(sub)
    return parser


# Failures the user can act on: the message is the whole story, a traceback adds nothing.
EXPECTED_ERRORS = (CliError, runs.RunError, MachineError, ConsoleError, SetupMissing, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command == "backend":
        level = min(level, logging.INFO)  # the backend log is the trace users read
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EXPECTED_ERRORS as exc:
        if args.verbose:
            raise
        print(f"viommu {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
