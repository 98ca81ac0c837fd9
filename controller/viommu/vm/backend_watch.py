"""The watcher of a detached VM's backend (`viommu up`).

The command that boots a detached VM exits at once, so nobody would be left to learn how its
backend ended: a SIGKILL, a crash in the data plane and a clean exit would all look the same
(a pid that is gone). The watcher is the backend's parent instead: a small process that
starts it, tells the launcher its pid, waits for it and writes how it ended to
`backend-exit.json` in the run directory, which `viommu ls` and every other command read.

    python -m viommu.vm.backend_watch --record PATH --pid-fd N [--pass-fd FD ...] -- CMD...

It imports nothing of viommu, holds none of the backend's sockets once the backend runs
(so a dead backend's sockets refuse connections at once), and leaves QEMU alone: a VM whose
backend died is the user's to inspect and to end (`viommu down`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

EXIT_RECORD = "backend-exit.json"
RECORD_WAIT = 0.5  # seconds a reader that has just seen the backend die gives the watcher


def describe(status: int) -> str:
    """A process's exit as subprocess reports it: 'exited with status N' or 'killed by
    SIGNAME'."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by {name}"
    return f"exited with status {status}"


def read_record(path: str, wait: float = 0.0) -> dict | None:
    """What the watcher wrote: {"pid", "status", "how", "time"}; None before it has.

    `wait`: seconds to give the watcher. A killed backend is gone from /proc (a zombie has
    no command line) a moment before its watcher has reaped it and written the record, so a
    reader that has just seen it die waits for the record rather than report it unknown."""
    deadline = time.monotonic() + wait
    while True:
        record = _read(path)
        if record is not None or time.monotonic() >= deadline:
            return record
        time.sleep(0.02)


def _read(path: str) -> dict | None:
    try:
        with open(path) as record:
            data = json.load(record)
        return data if isinstance(data, dict) and "how" in data else None
    except (OSError, ValueError):
        return None


def _write_record(path: str, pid: int, status: int) -> None:
    record = {"pid": pid, "status": status, "how": describe(status), "time": time.time()}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as out:
            json.dump(record, out)
        os.replace(tmp, path)  # readers never see half a file
    except OSError:
        pass  # the run directory is gone: `viommu down` has cleaned up already


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="viommu.vm.backend_watch")
    parser.add_argument("--record", required=True)
    parser.add_argument("--pid-fd", type=int, required=True)
    parser.add_argument("--pass-fd", type=int, action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    # Signals that would end the watcher without the backend: the backend ends first, and
    # the watcher records it (viommu down sends its signals to the backend's pid).
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(command, pass_fds=args.pass_fd, stdin=subprocess.DEVNULL,
                                preexec_fn=_default_signals)
    except OSError as exc:
        os.write(args.pid_fd, f"error {exc}\n".encode())
        return 1
    for fd in (*args.pass_fd, args.pid_fd):
        if fd == args.pid_fd:
            os.write(fd, f"{proc.pid}\n".encode())
        os.close(fd)
    _write_record(args.record, proc.pid, proc.wait())
    return 0


def _default_signals() -> None:
    """In the backend, before exec: the signals the watcher ignores act again."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
