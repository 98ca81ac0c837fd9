"""The `viommu` command line: `viommu demo` (the main job) and `viommu backend`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from viommu import __version__
from viommu.page_requests import POLICIES


def _int(text: str) -> int:
    return int(text, 0)


def cmd_backend(args: argparse.Namespace) -> int:
    from viommu.backend import Backend
    from viommu.device import DeviceConfig

    endpoints = args.endpoint or []
    if not endpoints:
        print("viommu backend: give at least one --endpoint ID (the VIOT endpoint IDs this "
              "vIOMMU translates, e.g. 0x100 for 01:00.0)", file=sys.stderr)
        return 2
    backend = Backend(args.socket, args.control, endpoints,
                      DeviceConfig(bypass=args.bypass), event_capacity=args.event_fifo,
                      exit_on_disconnect=not args.persist,
                      page_request_policy=args.page_request_policy)
    try:
        asyncio.run(backend.serve())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from viommu.demo import run_demo

    return run_demo(profile=args.profile, accel=args.accel, keep_logs=args.logs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viommu", description=__doc__)
    parser.add_argument("--version", action="version", version=f"viommu {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="boot a guest behind the vIOMMU, inject C_BAD_STE, "
                          "C_BAD_CD and F_TRANSLATION, show what the guest printed")
    demo.add_argument("--profile", default="default", help="machine profile in qemu-configs/")
    demo.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    demo.add_argument("--logs", metavar="DIR", help="keep QEMU, console and backend logs here")
    demo.set_defaults(func=cmd_demo)

    backend = sub.add_parser("backend", help="serve a virtio-iommu over vhost-user")
    backend.add_argument("--socket", required=True, help="vhost-user socket to listen on")
    backend.add_argument("--control", help="QMP control socket to listen on")
    backend.add_argument("--endpoint", type=_int, action="append", metavar="ID",
                         help="endpoint ID behind this vIOMMU (repeat)")
    backend.add_argument("--bypass", action="store_true",
                         help="unattached endpoints bypass translation (config `bypass`=1)")
    backend.add_argument("--event-fifo", type=int, default=1024, metavar="N",
                         help="fault records held while the guest has no eventq buffer")
    backend.add_argument("--page-request-policy", choices=POLICIES,
                         default="invalid", help="how page request groups are answered")
    backend.add_argument("--persist", action="store_true",
                         help="keep serving after the front-end disconnects")
    backend.set_defaults(func=cmd_backend)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command == "backend":
        level = min(level, logging.INFO)  # the backend log is the trace users read
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
