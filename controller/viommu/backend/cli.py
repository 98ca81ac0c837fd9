"""`viommu backend`: the process a VM's virtio-iommu runs in, its arguments and its run.

The `viommu` command line adds these arguments to its `backend` subcommand; a launcher
runs `python -m viommu.backend.cli` instead, because the guest's boot waits for this
process and this module imports only what the backend needs.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys

from viommu.dataplane.requestq import DEFAULT_POLL_US
from viommu.events.page_requests import POLICIES
from viommu.uapi import MSI_WINDOW_X86

HELP = "serve a virtio-iommu over vhost-user"
EXAMPLES = """
viommu backend --socket vu.sock --control ctl.sock --endpoint 0x100
viommu backend --socket vu.sock --endpoint 0x100 --endpoint 0x200 --poll-us 0
viommu backend --socket vu.sock --endpoint 0x100 --null-device    # benchmark floor"""


def int_arg(text: str) -> int:
    """An integer command-line argument, decimal or 0x-hex (IDs, addresses)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (decimal, or hex with "
                                         "0x: 256, 0x100)") from None


def range_arg(text: str) -> tuple[int, int]:
    """START-END, both inclusive, decimal or 0x-hex."""
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r} is not START-END")
    first, last = int(start, 0), int(end, 0)
    if last < first:
        raise ValueError(f"{text!r} ends before it starts")
    return first, last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, help="vhost-user socket to listen on")
    parser.add_argument("--control", help="QMP control socket to listen on")
    parser.add_argument("--endpoint", type=int_arg, action="append",
                        metavar="ID", help="endpoint ID behind this vIOMMU (repeat)")
    parser.add_argument("--msi-window", type=range_arg, metavar="START-END",
                        default=MSI_WINDOW_X86,
                        help="the platform's MSI doorbell range, reported as reserved in PROBE "
                             "(default: x86's 0xfee00000-0xfeefffff; virt's ITS page is "
                             "0x8090000-0x809ffff)")
    parser.add_argument("--bypass", action="store_true",
                        help="unattached endpoints bypass translation (config `bypass`=1)")
    parser.add_argument("--event-fifo", type=int, default=1024, metavar="N",
                        help="fault records held while the guest has no eventq buffer")
    parser.add_argument("--page-request-policy", choices=POLICIES,
                        default="invalid", help="how page request groups are answered")
    parser.add_argument("--poll-us", type=float, default=DEFAULT_POLL_US, metavar="US",
                        help="the request thread busy-polls at most this long after a "
                        "request, with the guest's kicks suppressed (0: sleep until kicked); "
                        "the window adapts below that to what polling earns")
    parser.add_argument("--fixed-poll", action="store_true",
                        help="always busy-poll --poll-us after a request (no adapting)")
    parser.add_argument("--no-request-thread", action="store_true",
                        help="serve the requestq on the event loop in Python (slower; "
                        "for comparison and debugging)")
    parser.add_argument("--no-event-thread", action="store_true",
                        help="serve the eventq on the event loop (for comparison)")
    parser.add_argument("--null-device", action="store_true",
                        help="benchmark mode: the request thread answers every request "
                        "S_OK and does nothing else (no domains, no mappings, no "
                        "translation): the floor the transport itself costs")
    parser.add_argument("--persist", action="store_true",
                        help="keep serving after the front-end disconnects")
    parser.add_argument("--socket-fd", type=int, metavar="FD",
                        help="serve on this inherited socket, already listening at --socket "
                        "(a launcher binds both sockets first and starts QEMU at once)")
    parser.add_argument("--control-fd", type=int, metavar="FD",
                        help="the same for --control")


def run(args: argparse.Namespace) -> int:
    """Serve until the VM goes (or forever with --persist); 2 for unusable arguments."""
    from viommu.backend.backend import Backend, BackendOptions
    from viommu.device.config import DeviceConfig

    problem = _argument_problem(args)
    if problem:
        print(f"viommu backend: {problem}", file=sys.stderr)
        return 2
    # A crash in the data plane (SIGSEGV, SIGABRT) leaves the Python stacks of every thread
    # in the log (stderr is backend.log), beside the watcher's "killed by SIGSEGV".
    faulthandler.enable()
    listen_fds = (args.socket_fd, args.control_fd) if args.socket_fd is not None else None
    options = BackendOptions(event_capacity=args.event_fifo, exit_on_disconnect=not args.persist,
                             page_request_policy=args.page_request_policy,
                             request_thread=not args.no_request_thread,
                             event_thread=not args.no_event_thread, poll_us=args.poll_us,
                             adaptive_poll=not args.fixed_poll, null_device=args.null_device)
    config = DeviceConfig(bypass=args.bypass, resv_msi=args.msi_window)
    backend = Backend(args.socket, args.control, args.endpoint, config, options, listen_fds)
    try:
        backend.run()
    except KeyboardInterrupt:
        pass
    return 0


def _argument_problem(args: argparse.Namespace) -> str | None:
    if not args.endpoint:
        return ("give at least one --endpoint ID (the VIOT endpoint IDs this vIOMMU "
                "translates, e.g. 0x100 for 01:00.0)")
    if args.null_device and args.no_request_thread:
        return "--null-device is a mode of the request thread: drop --no-request-thread"
    if args.socket_fd is None and args.control_fd is not None:
        return "--control-fd needs --socket-fd too"
    if args.socket_fd is not None and args.control and args.control_fd is None:
        return "with --socket-fd, give the control socket as --control-fd too"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viommu backend", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    # INFO: the backend log is the trace users read.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
