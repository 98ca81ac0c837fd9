"""Commands on a running VM: `console`, `inject`, `trace`, `state` and `shell`."""

from __future__ import annotations

import argparse
import code
import json
import re
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from viommu.cli import views
from viommu.cli.common import attached_vm, say
from viommu.cli.inject_options import fields_from_args
from viommu.cli.terminal import DETACH_KEY_NAME, interact
from viommu.cli.tracing import TraceFollower, format_entry
from viommu.events.smmuv3 import EventId
from viommu.vm import runs


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
    fields = fields_from_args(args)
    with attached_vm(args.name) as (vm, state, _):
        log_path = Path(state.workdir) / "console.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        reply = vm.inject(args.event, args.sid, **fields)
    if args.json:
        say(json.dumps(reply))
    else:
        say(f"{args.event}: delivered {reply['delivered']}, pending {reply['pending']}, lost "
            f"{reply['lost']}, not forwarded {reply['not_forwarded']} (seq {reply['seq']})")
        if reply["guest_line"]:
            say(f"guest should print: {reply['guest_line']}")
        if reply["note"]:
            say(f"note: {reply['note']}")
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
            say(f"guest printed: {match.group(0).strip()}")
            return 0
        time.sleep(0.1)
    say(f"the guest printed no such line within {timeout:g} s (Linux prints at most 10 fault "
        f"lines per 5 s); see {log_path}")
    return 1


def cmd_trace(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.duration if args.duration else None
    shown = 0
    with attached_vm(args.name) as (vm, _, _):
        print(f"[following {args.name}: requests, faults, page requests, translations; Ctrl-C "
              "stops]", file=sys.stderr, flush=True)
        follower = TraceFollower(vm.backend, from_start=args.all)
        try:
            while deadline is None or time.monotonic() < deadline:
                for entry in follower.poll():
                    say(json.dumps(entry) if args.json else format_entry(entry))
                    shown += 1
                    if args.count and shown >= args.count:
                        return 0
                time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    with attached_vm(args.name) as (vm, state, _):
        if args.json:
            say(json.dumps({name: vm.backend(f"query-{name}") for name in (
                "endpoints", "domains", "requests", "events", "translations",
                "page-requests", "disks")} | {"hot_plugged": state.endpoints}, indent=1))
            return 0
        say(views.state_report(vm.backend))
        disks = vm.backend("query-disks")
    if disks:
        say("\ndisks (virtio-blk)\n" + views.table(
            ("endpoint", "guest", "image", "size", "reads", "writes", "flushes", "ioerrors",
             "faults", "status"),
            [(f"{d['endpoint']:#x}", _guest_disk(state, d["endpoint"]), d["image"],
              f"{d['size'] >> 20} MiB", d["reads"], d["writes"], d["flushes"], d["ioerrors"],
              d["faults_relayed"], d["error"] or d["virtio"]["status"]) for d in disks]))
    if state.endpoints:
        say("\nhot-plugged (viommu attach)\n" + views.table(
            ("device", "endpoint", "port"),
            [(e["name"], f"{e['endpoint_id']:#x}", e["port"]) for e in state.endpoints]))
    return 0


def _guest_disk(state, endpoint_id: int) -> str:
    for e in state.endpoints:
        if e["endpoint_id"] == endpoint_id and e.get("disk"):
            return f"/dev/{e['disk']}"
    return "-"



def cmd_shell(args: argparse.Namespace) -> int:
    with attached_vm(args.name, needs_backend=False) as (vm, _, _):
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

