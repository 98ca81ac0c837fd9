"""The `viommu` command line.

VMs that keep running between commands: `up` boots one, then `ls`, `console`, `inject`,
`trace`, `state`, `attach`, `detach`, `shell` use it by name, and `down` ends it. `demo` is
the one-shot tour; `backend` is the process a VM's virtio-iommu runs in.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
import threading
from typing import Any

from viommu import __version__
from viommu.backend import cli as backend_cli
from viommu.backend.cli import int_arg
from viommu.cli import readiness
from viommu.cli.common import CliError, add_guest_arguments, say
from viommu.cli.endpoints import cmd_attach, cmd_detach
from viommu.cli.session import cmd_down, cmd_ls, cmd_up
from viommu.cli.terminal import DETACH_KEY_NAME
from viommu.cli.vm_commands import cmd_console, cmd_inject, cmd_shell, cmd_state, cmd_trace
from viommu.events.smmuv3 import ADDRESS_EVENTS, FETCH_EVENTS, EventId
from viommu.provision import kconfig as kconfig_module
from viommu.provision.arch import ARCHES, get_arch
from viommu.provision.kernels import KernelNotFound, resolve_kernel
from viommu.vm import runs
from viommu.vm.console import ConsoleError
from viommu.vm.disks import parse_size
from viommu.vm.errors import MachineError
from viommu.vm.paths import SetupMissing
from viommu.vm.profile import ProfileError

EVENT_NAMES = [e.name for e in EventId]


def cmd_demo(args: argparse.Namespace) -> int:
    from viommu.cli.demo import run_demo

    readiness.setup_if_asked(args, args.profile)
    return run_demo(profile=args.profile, accel=args.accel, keep_logs=args.logs,
                    kernel=args.kernel, modules=args.modules, arch=args.arch)


def cmd_kconfig(args: argparse.Namespace) -> int:
    """Print the fragment; with --kernel, check that kernel instead (exit 1 when it lacks
    something)."""
    if args.kernel is None:
        say(kconfig_module.fragment(args.arch, args.feature).rstrip())
        return 0
    kernel = resolve_kernel(args.kernel, get_arch(args.arch), args.modules)
    config = kconfig_module.read_config(kernel)
    if config is None:
        raise CliError(f"kernel {kernel.release}: no configuration found (no .config or "
                       f"config-{kernel.release} beside it, no IKCONFIG in the image)")
    gaps = kconfig_module.missing(kernel, config, args.feature)
    if gaps:
        say(kconfig_module.explain(kernel, gaps))
        return 1
    say(f"kernel {kernel.release} ({kernel.origin}) has what viommu needs")
    return 0


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
viommu up default --accel tcg
viommu up default --kernel 6.12              # Debian's 6.12 LTS kernel (fetched once)
viommu up default --kernel ~/src/linux       # the kernel you just built
viommu up default --arch aarch64             # an arm64 guest on QEMU's virt machine
viommu up ./my-profile.toml                  # a profile of your own, anywhere
viommu up default --setup                    # run `viommu setup` for it first""")
    up.add_argument("profile", metavar="PROFILE",
                    help="machine profile: a name in qemu-configs/ or a .toml path")
    up.add_argument("--name", help="name to use it by (default: the profile's)")
    up.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    up.add_argument("--timeout", type=float, default=120, metavar="S",
                    help="seconds to wait for the guest's shell")
    add_guest_arguments(up)
    readiness.add_setup_flag(up)

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
viommu inject default E_PAGE_REQUEST --addr 0xdeadb000 --access write --span 2

events:
{everything}
with an address (--addr, --access, --privileged, --s2, --ipa, --class, --stall):
{with_address}
with a fetch address (--fetch-addr):
{with_fetch}
a page request hint, E_PAGE_REQUEST: a page address (--addr), the access it anticipates
  (--access, --privileged) and the pages it spans (--span)
an endpoint the guest does not have (declared with add-endpoint and never probed, or
  hot-unplugged) takes events only with --force; the answer then says so""")
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
    inject.add_argument("--span", type=int, help="E_PAGE_REQUEST: the pages it spans")
    inject.add_argument("--count", type=int, help="a burst of this many")
    inject.add_argument("--force", action="store_true",
                        help="deliver even for an endpoint the guest does not have")
    inject.add_argument("--json", action="store_true", help="print the answer as JSON")
    inject.add_argument("--wait", type=float, metavar="S",
                        help="wait up to S seconds for the guest's fault line in console.log")


def _endpoint_commands(sub: Any) -> None:
    attach = _add(sub, "attach", cmd_attach, "hot-plug a DMA endpoint or a virtio-blk disk "
                  "(served over vfio-user) into a root port", """
viommu attach default --port 1
viommu attach default --port 3 --pri --id dma-pri --vfio
viommu attach default --port 2 --blk                     # a 64 MiB disk in the run directory
viommu attach default --port 2 --blk --image my.img --size 256M --read-only""")
    _add_name(attach)
    attach.add_argument("--port", type=int, required=True, help="root port number (rpN)")
    attach.add_argument("--pri", action="store_true", help="with PCIe PRI (page requests)")
    attach.add_argument("--id", help="QEMU device id (default dmaPORT, diskPORT)")
    attach.add_argument("--vfio", action="store_true",
                        help="bind it to vfio-pci in the guest (for viommu-vfio dma)")
    attach.add_argument("--blk", action="store_true",
                        help="a virtio-blk disk: the guest's virtio_blk drives it, every DMA "
                             "translated")
    attach.add_argument("--image", help="--blk: the raw image (created when missing; default "
                                        "disk-ID.img in the run directory)")
    attach.add_argument("--size", type=parse_size, help="--blk: size of a new image (256M, "
                                                        "1G...; default 64M)")
    attach.add_argument("--read-only", action="store_true", help="--blk: a read-only disk")

    detach = _add(sub, "detach", cmd_detach, "unplug an endpoint or disk `attach` plugged", """
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
    setup = _add(sub, "setup", readiness.cmd_setup, readiness.HELP, readiness.EXAMPLES)
    readiness.add_arguments(setup)

    demo = _add(sub, "demo", cmd_demo, "boot a guest behind the vIOMMU, inject C_BAD_STE, "
                "C_BAD_CD and F_TRANSLATION, show what the guest printed", """
viommu demo
viommu demo --accel tcg --logs /tmp/demo-logs
viommu demo --setup            # run `viommu setup` for it first""")
    demo.add_argument("--profile", default="default",
                      help="machine profile: a name in qemu-configs/ or a .toml path")
    demo.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    demo.add_argument("--logs", metavar="DIR", help="keep QEMU, console and backend logs here")
    add_guest_arguments(demo)
    readiness.add_setup_flag(demo)

    kconfig = _add(sub, "kconfig", cmd_kconfig, "what a guest kernel's configuration needs: a "
                   "fragment to merge, or what a given kernel lacks", """
viommu kconfig > viommu.config               # then, in the kernel tree:
scripts/kconfig/merge_config.sh .config viommu.config
viommu kconfig --arch aarch64 --feature vfio
viommu kconfig --kernel ~/src/linux          # check a kernel: exit 1 if it lacks something""")
    kconfig.add_argument("--arch", choices=sorted(ARCHES), default="x86_64")
    kconfig.add_argument("--feature", action="append", choices=kconfig_module.FEATURES,
                         help="only these features' options besides the basics (repeat; "
                              "default: every feature)")
    kconfig.add_argument("--kernel", metavar="SPEC", help="check this kernel instead")
    kconfig.add_argument("--modules", metavar="DIR", help="with --kernel IMAGE: its modules")

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
EXPECTED_ERRORS = (CliError, runs.RunError, MachineError, ConsoleError, SetupMissing,
                   ProfileError, KernelNotFound, OSError)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (the terminal closed): unwound like Ctrl-C, so that clean-up runs
    (a VM that `up` was booting is stopped, not left running unseen)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def _terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command == "backend":
        level = min(level, logging.INFO)  # the backend log is the trace users read
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:  # its connection failures are ours to explain, in one line
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL + 1)
        if args.command != "backend":
            # A Ctrl-C that lands inside qemu.qmp's event loop leaves a task behind, which
            # qemu.qmp and asyncio would report at exit as a library bug: the command has
            # said what happened, and cleaned up.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {}
    if args.command != "backend" and threading.current_thread() is threading.main_thread():
        previous = {sig: signal.getsignal(sig) for sig in signals}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _terminated)
    try:
        return _run(args)
    finally:
        for sig, handler in previous.items():
            # The program is done and only exits: one more Ctrl-C must not turn that into a
            # traceback. Inside another program (tests, shells), as they were.
            signal.signal(sig, signal.SIG_IGN if argv is None else handler)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except EXPECTED_ERRORS as exc:
        if args.verbose:
            raise
        print(f"viommu {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        what = exc.args[0] if isinstance(exc, Terminated) else "Ctrl-C"
        print(f"\nviommu {args.command}: interrupted ({what}){_after_interrupt(args)}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `viommu state --json | head`: the reader has what it wanted
        # Python's own advice (signal docs, "Note on SIGPIPE"): no flush error at exit; and
        # the status of a writer whose reader left, as shells give it (128 + SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted command left, in a few words (the command says, as it goes)."""
    return getattr(args, "interrupted", "")


if __name__ == "__main__":
    sys.exit(main())
